//! The raw shape of `lever.yaml`, exactly as written: every key optional at
//! this layer (so one run can report every missing key), unknown keys
//! rejected. `lever schema` is generated from these types; the validated
//! model is built from them in `build.rs`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

/// A Lever application: the manager agent, its groves, the jail built
/// around them and the host-side capability broker.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "lever.yaml")]
pub struct RawConfig {
    /// Instance identity: the jail machine is `lever-<name>` and the
    /// manager's Scion slug is `<name>`. Must match `^[a-z0-9][a-z0-9-]{0,62}$`.
    #[schemars(required, regex(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$"))]
    pub name: Option<String>,
    /// Containment backend (see `lever backends`). Unknown names are
    /// rejected, never substituted.
    #[schemars(required)]
    pub backend: Option<String>,
    /// The one writable host mount: a confined relative subdirectory of the
    /// instance root (not `.`, not absolute, no `..`, no symlink leaving the root).
    #[schemars(required)]
    pub tree: Option<String>,
    /// Where the Scion engine comes from: at most one of `version` or `source`.
    pub scion: Option<RawScion>,
    /// The manager agent.
    #[schemars(required)]
    pub manager: Option<RawManager>,
    /// Project agents the manager orchestrates.
    pub groves: Option<Vec<RawGrove>>,
    /// Jail egress posture: `open` (LAN and other host ports dropped, public
    /// internet reachable) or `closed` (only the broker port; `allow_ports` are ignored).
    /// Default `open`.
    pub egress: Option<Egress>,
    /// The host-side capability broker.
    pub broker: Option<RawBroker>,
    /// Optional image policy.
    pub security: Option<RawSecurity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Egress {
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LlmAuth {
    /// The agent holds only a capability token; the broker injects the real key.
    ApiKey,
    /// The OAuth token is projected into the agents.
    Subscription,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawScion {
    /// A Scion module version or commit (`666333f9`, `v1.2.3`), fetched and
    /// cross-compiled into the jail at provision time.
    pub version: Option<String>,
    /// A local Scion checkout (relative to the config file's directory,
    /// confined to the instance root, outside the tree).
    pub source: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawManager {
    /// Container image for the manager, and the default for groves.
    pub image: Option<String>,
    /// Boot task file, confined to the instance root and outside the tree.
    pub prompt_file: Option<String>,
    /// OAuth token file projected to the agents (subscription mode only);
    /// a regular file, mode 0600 or stricter, owned by you.
    pub credential_file: Option<String>,
    /// Host tool ports the jail may reach over the host alias.
    pub allow_ports: Option<Vec<i64>>,
    /// `api-key` or `subscription`; inherits `broker.llm_auth`. The whole
    /// instance must be uniform.
    pub llm_auth: Option<LlmAuth>,
    /// Capabilities this agent may obtain from the broker.
    pub obtain: Option<Vec<RawRight>>,
    /// Capabilities this agent may delegate to other agents.
    pub delegate: Option<Vec<RawDelegate>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawGrove {
    /// Grove identity (its agent slug and capability identity).
    #[schemars(required)]
    pub name: Option<String>,
    /// Grove directory, relative to `tree` and inside it.
    #[schemars(required)]
    pub dir: Option<String>,
    /// Container image; defaults to `manager.image`.
    pub image: Option<String>,
    /// Same as `manager.llm_auth`; the instance must be uniform.
    pub llm_auth: Option<LlmAuth>,
    /// Capabilities this grove may obtain.
    pub obtain: Option<Vec<RawRight>>,
    /// Capabilities this grove may delegate.
    pub delegate: Option<Vec<RawDelegate>>,
}

/// A `(tool, op)` right: a configured tool and one of its operations, or
/// `llm` / `generate`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRight {
    #[schemars(required)]
    pub tool: Option<String>,
    #[schemars(required)]
    pub op: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDelegate {
    #[schemars(required)]
    pub tool: Option<String>,
    #[schemars(required)]
    pub op: Option<String>,
    /// The agents a token may be minted for (grove names or the manager identity).
    #[schemars(required)]
    pub to: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBroker {
    /// Instance-wide LLM auth mode, inherited by agents. Default `api-key`.
    pub llm_auth: Option<LlmAuth>,
    /// The real Anthropic key, read host-side only. Required in api-key
    /// mode; a regular file, mode 0600 or stricter, owned by you.
    pub api_key_file: Option<String>,
    /// The LLM upstream. Default `https://api.anthropic.com`; `http://` only
    /// for a loopback host. Never derived from a request.
    pub upstream: Option<String>,
    /// An extra trusted root (PEM) for the upstream, outside the tree.
    pub upstream_ca_file: Option<String>,
    /// How long the upstream may take to send its response headers before
    /// the caller gets a 504 (`10s`, `2m`). Default `120s`.
    pub upstream_header_timeout: Option<String>,
    /// Address of the mTLS jail listener. Default `127.0.0.1`.
    pub bind: Option<String>,
    /// mTLS port the jail reaches the broker on. Default 8443.
    #[schemars(range(min = 1, max = 65535))]
    pub jail_port: Option<i64>,
    /// Loopback-only, unauthenticated admin port. Default 8444. Never in
    /// `allow_ports`.
    #[schemars(range(min = 1, max = 65535))]
    pub admin_port: Option<i64>,
    /// Address of the admin listener; must be a loopback address. Default `127.0.0.1`.
    pub admin_bind: Option<String>,
    /// Capability token lifetime (`90s`, `30m`, `24h`, `7d`). Default `24h`.
    pub grant_ttl: Option<String>,
    /// Enrolment ticket lifetime. Default `10m`.
    pub ticket_ttl: Option<String>,
    /// The capability identity (certificate CN) of the manager. Default `manager`.
    pub manager_identity: Option<String>,
    /// Broker state: CA, root key, epoch, revocations, audit log. Default
    /// `<root>/.lever`; must be outside the tree.
    pub state_dir: Option<String>,
    /// Brokered MCP tools.
    pub tools: Option<Vec<RawTool>>,
    /// Per-agent rate limits and LLM token budget.
    pub rate_limits: Option<RawRateLimits>,
    /// OpenTelemetry export and the audit file.
    pub telemetry: Option<RawTelemetry>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTool {
    /// Tool name (`^[a-z0-9][a-z0-9-]{0,62}$`, not `llm`); its operations are
    /// listed to agents as `NAME_OP`.
    #[schemars(required)]
    pub name: Option<String>,
    /// `http` (default): a supervised subprocess spoken to over MCP streamable
    /// HTTP on `backend`; `stdio`: an MCP server on stdin/stdout.
    pub transport: Option<Transport>,
    /// The argv of the supervised process (no shell).
    #[schemars(required)]
    pub command: Option<Vec<String>>,
    /// Loopback `IP:PORT` the http backend listens on (passed as `-backend ADDR`).
    pub backend: Option<String>,
    /// The operations (MCP tool names) agents may be granted.
    #[schemars(required)]
    pub operations: Option<Vec<RawOperation>>,
    /// Constraint keys pinned at mint, each to one of these values.
    pub allowed_values: Option<BTreeMap<String, Vec<String>>>,
    /// Longest a call may take before the agent gets an error (default
    /// `30s`, `100ms` to `1h`).
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    Http,
    Stdio,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOperation {
    /// The MCP tool name the backend answers to
    /// (`^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$`, e.g. `read`, `read_file`);
    /// agents see it as `TOOL_OP`.
    #[schemars(required)]
    pub name: Option<String>,
    /// The argument names this operation takes; when given, every
    /// `allowed_values` key must be one of them.
    pub args: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimits {
    /// Per-agent limits on `/llm` requests.
    pub llm: Option<RawLimit>,
    /// Per-agent limits on tool calls.
    pub tools: Option<RawLimit>,
    /// Per-agent limits on minting, delegation, renewal, provisioning and
    /// dispatch (`/v1/capabilities`, `/v1/capabilities/delegate`,
    /// `/v1/renew`, `/v1/provision`, `/v1/agents/{name}/start|stop`).
    pub control: Option<RawLimit>,
    /// Optional per-agent LLM token budget.
    pub llm_tokens: Option<RawTokenBudget>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    /// Sustained requests per minute.
    #[schemars(range(min = 1))]
    pub per_minute: Option<i64>,
    /// Requests allowed at once above the sustained rate.
    #[schemars(range(min = 1))]
    pub burst: Option<i64>,
    /// Requests in flight at once.
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<i64>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTokenBudget {
    /// Input plus output tokens allowed per window.
    #[schemars(required, range(min = 1))]
    pub tokens: Option<i64>,
    /// The window (`1h`, `1d`).
    #[schemars(required)]
    pub window: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    /// OTLP collector endpoint; `OTEL_EXPORTER_OTLP_ENDPOINT` otherwise.
    pub otlp_endpoint: Option<String>,
    /// `http` (protobuf over HTTP, default) or `grpc`.
    pub otlp_protocol: Option<OtlpProtocol>,
    /// Service name; `OTEL_SERVICE_NAME` otherwise, then `lever-broker`.
    pub service_name: Option<String>,
    /// The audit trail. Default `<state_dir>/audit.jsonl`; outside the tree.
    pub audit_file: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OtlpProtocol {
    Http,
    Grpc,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSecurity {
    /// Images are allowed only from these registries/namespaces, matched on
    /// whole path components. Empty: any registry.
    pub allowed_image_registries: Option<Vec<String>>,
    /// Every image must be pinned `@sha256:<hex>`.
    pub require_image_digest: Option<bool>,
}
