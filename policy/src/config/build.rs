//! Raw -> validated: every rule of `lever.yaml` (DESIGN.md §3 and the seed
//! config reference), each problem reported with its key path, all of them
//! in one run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::fs::{self, Env};
use super::model::*;
use super::problem::Sink;
use super::raw::*;
use super::values::{self, parse_duration};
use super::yaml::child_key;

/// The inputs of a build besides the raw config.
pub(crate) struct Inputs<'a> {
    pub(crate) env: &'a Env,
    /// The config file as named.
    pub(crate) file: &'a Path,
    /// The config file's real path.
    pub(crate) file_real: &'a Path,
    /// The instance root (real path of the config file's directory).
    pub(crate) root: &'a Path,
}

const MAX_AGENTS: usize = 256;
const MAX_TOOLS: usize = 128;
const MAX_VALUE_LEN: usize = 256;

/// Argument names of Lever's first-party tools, by command basename.
fn first_party_args(command: &[String]) -> Option<&'static [&'static str]> {
    let program = command.first()?;
    let base = program.rsplit('/').next().unwrap_or(program);
    match base {
        "lever-tool-db" => Some(&["table", "filter"]),
        "lever-tool-exec" => Some(&["command", "args"]),
        _ => None,
    }
}

pub(crate) fn build(raw: RawConfig, cx: &mut Sink<'_>, inp: &Inputs<'_>) -> Option<Config> {
    let name = required(cx, "name", raw.name.as_deref(), "the instance name")
        .and_then(|s| Name::parse(s).map_err(|e| cx.error("name", e)).ok());
    let instance_name = name.clone();
    let backend = required(
        cx,
        "backend",
        raw.backend.as_deref(),
        "the containment backend",
    )
    .and_then(|s| {
        Backend::from_name(s)
            .map_err(|e| cx.error("backend", e))
            .ok()
    });
    let tree = required(cx, "tree", raw.tree.as_deref(), "the mounted subdirectory")
        .and_then(|t| check_tree(cx, inp, t));
    let tree_real = tree.as_ref().map(|(_, real)| real.clone());
    let tree_real = tree_real.as_deref();

    let egress = raw.egress.unwrap_or(Egress::Open);
    let security = build_security(cx, raw.security.unwrap_or_default());
    let scion = raw.scion.and_then(|s| build_scion(cx, inp, tree_real, s));

    let mut b = raw.broker.unwrap_or_default();
    let broker_auth = b.llm_auth.unwrap_or(LlmAuth::ApiKey);
    let manager_identity = match &b.manager_identity {
        Some(s) => Name::parse(s)
            .map_err(|e| cx.error("broker.manager_identity", e))
            .ok(),
        None => Name::parse(DEFAULT_MANAGER_IDENTITY).ok(),
    };
    let (tools, declared) = build_tools(cx, inp, tree_real, b.tools.take().unwrap_or_default());

    let raw_manager = raw.manager.unwrap_or_else(|| {
        cx.missing(
            "manager",
            "the manager agent (at least `manager: {image: ...}`)",
        );
        RawManager::default()
    });
    let jail_port = port(cx, "broker.jail_port", b.jail_port, DEFAULT_JAIL_PORT);
    let admin_port = port(cx, "broker.admin_port", b.admin_port, DEFAULT_ADMIN_PORT);

    // Agents: identities first, so obtain/delegate can refer to any of them.
    let raw_groves = raw.groves.unwrap_or_default();
    if raw_groves.len() >= MAX_AGENTS {
        cx.error("groves", format!("at most {} groves", MAX_AGENTS - 1));
    }
    let mut identities: HashMap<String, String> = HashMap::new();
    if let Some(m) = &manager_identity {
        identities.insert(m.to_string(), "broker.manager_identity".to_owned());
    }
    let mut grove_names = Vec::with_capacity(raw_groves.len());
    for (i, g) in raw_groves.iter().enumerate() {
        let path = child_key(&cx.item("groves", i), "name");
        let name = required(cx, &path, g.name.as_deref(), "the grove's name")
            .and_then(|s| Name::parse(s).map_err(|e| cx.error(&path, e)).ok());
        if let Some(n) = &name {
            if instance_name.as_ref() == Some(n) {
                cx.error(
                    &path,
                    format!("`{n}` is the instance name, which is the manager's Scion agent slug: a grove of the same name would collide with it (rename the grove)"),
                );
            } else if let Some(first) = identities.get(n.as_str()) {
                cx.error(
                    &path,
                    format!("agent identity `{n}` is already used by {first}"),
                );
            } else {
                identities.insert(n.to_string(), path.clone());
            }
        }
        grove_names.push(name);
    }

    // LLM auth: uniform across the instance.
    let instance_auth = check_uniform_auth(cx, broker_auth, &raw_manager, &raw_groves);
    if egress == Egress::Closed && instance_auth == LlmAuth::Subscription {
        cx.error(
            "egress",
            "egress: closed requires an api-key instance (a subscription agent must reach the Anthropic API itself)",
        );
    }

    let refs = Refs {
        tools: &declared,
        identities: &identities,
        auth: instance_auth,
    };
    let manager_image = raw_manager
        .image
        .as_deref()
        .and_then(|s| check_image(cx, "manager.image", s, &security));
    let manager_agent = build_agent(
        cx,
        &refs,
        "manager",
        manager_identity.clone(),
        manager_image.clone(),
        raw_manager.obtain,
        raw_manager.delegate,
    );
    let prompt_file = raw_manager
        .prompt_file
        .as_deref()
        .and_then(|p| check_prompt_file(cx, inp, tree_real, p));
    let credential_file = raw_manager
        .credential_file
        .as_deref()
        .and_then(|p| check_secret(cx, inp, tree_real, "manager.credential_file", p));
    match instance_auth {
        LlmAuth::Subscription if raw_manager.credential_file.is_none() => cx.missing(
            "manager.credential_file",
            "subscription mode needs manager.credential_file (the OAuth token projected to the agents)",
        ),
        LlmAuth::ApiKey if raw_manager.credential_file.is_some() => cx.error(
            "manager.credential_file",
            "credential_file projects a credential into every agent; an api-key instance keeps credentials host-side (use llm_auth: subscription, or remove it)",
        ),
        _ => {}
    }

    let mut groves = Vec::with_capacity(raw_groves.len());
    let mut dirs: HashMap<PathBuf, String> = HashMap::new();
    for (i, (g, name)) in raw_groves.into_iter().zip(grove_names).enumerate() {
        let base = cx.item("groves", i);
        let dir_path = child_key(&base, "dir");
        let dir = required(
            cx,
            &dir_path,
            g.dir.as_deref(),
            "the grove's directory, relative to tree",
        )
        .and_then(|d| check_grove_dir(cx, &dir_path, tree_real, d));
        if let Some(d) = &dir {
            if let Some(first) = dirs.get(d) {
                cx.warning(&dir_path, format!("the same directory as {first}"));
            } else {
                dirs.insert(d.clone(), dir_path.clone());
            }
        }
        let image = match g.image.as_deref() {
            Some(s) => check_image(cx, &child_key(&base, "image"), s, &security),
            None => manager_image.clone(),
        };
        let agent = build_agent(cx, &refs, &base, name, image, g.obtain, g.delegate);
        if let (Some(agent), Some(dir_rel)) = (agent, dir) {
            groves.push(Grove { agent, dir_rel });
        }
    }

    let allow_ports = check_allow_ports(
        cx,
        raw_manager.allow_ports.unwrap_or_default(),
        (jail_port, admin_port),
        // Closed egress reaches no tool backend: no bypass to warn of.
        if egress == Egress::Closed {
            &[]
        } else {
            &tools
        },
    );
    if egress == Egress::Closed && !allow_ports.is_empty() {
        cx.warning(
            "manager.allow_ports",
            "ignored: with `egress: closed` the jail reaches the broker's jail port only",
        );
    }
    let ports = (jail_port, admin_port);
    let broker = build_broker(
        cx,
        inp,
        tree_real,
        b,
        &tools,
        manager_identity,
        instance_auth,
        ports,
    );

    if manager_image.is_none() && raw_manager.image.is_none() {
        cx.warning(
            "manager",
            "no manager.image: agents cannot start until one is set",
        );
    }

    if cx.error_count() > 0 {
        return None;
    }
    let ((tree_rel, tree), manager_agent, broker) = (tree?, manager_agent?, broker?);
    Some(Config {
        file: inp.file.to_path_buf(),
        root: inp.root.to_path_buf(),
        name: name?,
        backend: backend?,
        tree_rel,
        tree,
        scion,
        manager: Manager {
            agent: manager_agent,
            prompt_file,
            credential_file,
            allow_ports,
        },
        groves,
        egress,
        llm_auth: instance_auth,
        broker,
        security,
    })
}

fn required<'s>(cx: &mut Sink<'_>, path: &str, v: Option<&'s str>, what: &str) -> Option<&'s str> {
    if v.is_none() {
        cx.missing(path, what);
    }
    v
}

fn check_tree(cx: &mut Sink<'_>, inp: &Inputs<'_>, raw: &str) -> Option<(PathBuf, PathBuf)> {
    let rel = match fs::confined_relative(raw) {
        Ok(r) => r,
        Err(e) => {
            cx.error(
                "tree",
                format!("{e}; tree is a subdirectory of the instance root"),
            );
            return None;
        }
    };
    if rel.as_os_str().is_empty() {
        cx.error(
            "tree",
            "must not be the instance root itself: the root holds the config and is never mounted",
        );
        return None;
    }
    let real = match fs::confined_real(inp.root, &rel) {
        Ok(r) => r,
        Err(e) => {
            cx.error("tree", e);
            return None;
        }
    };
    if real == inp.root {
        cx.error(
            "tree",
            "resolves to the instance root itself through a symlink",
        );
        return None;
    }
    if fs::within(inp.file_real, &real) {
        cx.error(
            "tree",
            "contains the config file: an agent could rewrite the policy the host trusts",
        );
        return None;
    }
    match std::fs::metadata(&real) {
        Ok(md) if !md.is_dir() => {
            cx.error("tree", format!("{} is not a directory", real.display()));
            return None;
        }
        _ => {}
    }
    Some((rel, real))
}

/// A path confined to the instance root and outside the tree.
fn confined_outside_tree(
    cx: &mut Sink<'_>,
    inp: &Inputs<'_>,
    tree: Option<&Path>,
    path: &str,
    raw: &str,
) -> Option<PathBuf> {
    let rel = match fs::confined_relative(raw) {
        Ok(r) if r.as_os_str().is_empty() => {
            cx.error(
                path,
                "must name a path inside the instance root, not the root itself",
            );
            return None;
        }
        Ok(r) => r,
        Err(e) => {
            cx.error(
                path,
                format!("{e}; it is resolved against the instance root"),
            );
            return None;
        }
    };
    let real = match fs::confined_real(inp.root, &rel) {
        Ok(r) => r,
        Err(e) => {
            cx.error(path, e);
            return None;
        }
    };
    outside_tree(
        cx,
        tree,
        path,
        (&inp.root.join(&rel), &real),
        "agents can write there, so it must live outside it",
    )
    .then_some(real)
}

/// `real` (the path `given` resolves to) must lie outside the tree, and
/// `given` must not pass through it on the way.
fn outside_tree(
    cx: &mut Sink<'_>,
    tree: Option<&Path>,
    path: &str,
    (given, real): (&Path, &Path),
    why: &str,
) -> bool {
    if tree.is_some_and(|t| fs::within(real, t)) {
        cx.error(
            path,
            format!("{} is inside the tree: {why}", real.display()),
        );
        return false;
    }
    match tree.and_then(|t| fs::through_tree(given, t)) {
        Some(d) => {
            cx.error(
                path,
                format!(
                    "{} passes through {}, which is in the tree: agents could repoint it (a symlink of theirs) before the config is next loaded",
                    given.display(),
                    d.display()
                ),
            );
            false
        }
        None => true,
    }
}

fn check_prompt_file(
    cx: &mut Sink<'_>,
    inp: &Inputs<'_>,
    tree: Option<&Path>,
    raw: &str,
) -> Option<PathBuf> {
    let path = "manager.prompt_file";
    let real = confined_outside_tree(cx, inp, tree, path, raw)?;
    match fs::regular_file(&real, fs::PROMPT_FILE_MAX)
        .and_then(|md| fs::not_writable_by_others(&real, &md, inp.env))
    {
        Ok(()) => Some(real),
        Err(e) => {
            cx.error(path, e);
            None
        }
    }
}

fn check_secret(
    cx: &mut Sink<'_>,
    inp: &Inputs<'_>,
    tree: Option<&Path>,
    path: &str,
    raw: &str,
) -> Option<PathBuf> {
    let base = inp.root;
    let p = match fs::resolve(raw, base, inp.env) {
        Ok(p) => p,
        Err(e) => {
            cx.error(path, e);
            return None;
        }
    };
    let real = match fs::real_path(&p) {
        Ok(r) => r,
        Err(e) => {
            cx.error(path, e);
            return None;
        }
    };
    if !outside_tree(
        cx,
        tree,
        path,
        (&p, &real),
        "every agent could read the secret",
    ) {
        return None;
    }
    match fs::secret_file(&p, inp.env) {
        Ok(()) => Some(real),
        Err(e) => {
            cx.error(path, e);
            None
        }
    }
}

fn check_grove_dir(
    cx: &mut Sink<'_>,
    path: &str,
    tree: Option<&Path>,
    raw: &str,
) -> Option<PathBuf> {
    let rel = match fs::confined_relative(raw) {
        Ok(r) => r,
        Err(e) => {
            cx.error(
                path,
                format!("{e}; a grove dir is relative to tree and inside it"),
            );
            return None;
        }
    };
    if let Some(tree) = tree {
        let real = match fs::real_path(&tree.join(&rel)) {
            Ok(r) => r,
            Err(e) => {
                cx.error(path, e);
                return None;
            }
        };
        if !fs::within(&real, tree) {
            cx.error(
                path,
                format!(
                    "resolves to {} through a symlink, outside the tree",
                    real.display()
                ),
            );
            return None;
        }
    }
    Some(rel)
}

fn build_scion(
    cx: &mut Sink<'_>,
    inp: &Inputs<'_>,
    tree: Option<&Path>,
    s: RawScion,
) -> Option<Scion> {
    match (s.version, s.source) {
        (Some(_), Some(_)) => {
            cx.error(
                "scion",
                "give at most one of `version` and `source`, not both",
            );
            None
        }
        (Some(v), None) => match values::check_scion_version(&v) {
            Ok(()) => Some(Scion::Version(v)),
            Err(e) => {
                cx.error("scion.version", e);
                None
            }
        },
        (None, Some(src)) => {
            // Anywhere on the host (`~/`, absolute, or relative to the
            // root), but never through the tree: it is built on the host.
            let path = "scion.source";
            let (given, real) = fs::resolve(&src, inp.root, inp.env)
                .and_then(|given| fs::real_path(&given).map(|real| (given, real)))
                .map_err(|e| cx.error(path, e))
                .ok()?;
            if !outside_tree(
                cx,
                tree,
                path,
                (&given, &real),
                "agents could change the Scion built on the host for the jail",
            ) {
                return None;
            }
            match std::fs::metadata(&real) {
                Ok(md) if md.is_dir() => Some(Scion::Source(real)),
                Ok(_) => {
                    cx.error(
                        "scion.source",
                        format!("{} is not a directory", real.display()),
                    );
                    None
                }
                Err(e) => {
                    cx.error("scion.source", format!("{}: {e}", real.display()));
                    None
                }
            }
        }
        (None, None) => None,
    }
}

fn build_security(cx: &mut Sink<'_>, s: RawSecurity) -> Security {
    let mut out = Security {
        allowed_image_registries: Vec::new(),
        require_image_digest: s.require_image_digest.unwrap_or(false),
    };
    for (i, r) in s
        .allowed_image_registries
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let path = cx.item("security.allowed_image_registries", i);
        let entry = r.trim_end_matches('/');
        if entry.contains('@') {
            cx.error(
                &path,
                format!("{r:?} must be a registry and/or namespace, without a digest"),
            );
            continue;
        }
        match values::check_registry_prefix(entry) {
            Ok(()) if entry == r => out.allowed_image_registries.push(r),
            Ok(()) => cx.error(
                &path,
                format!("{r:?} must not end with '/': write {entry:?} (entries already match on whole path components)"),
            ),
            Err(e) => cx.error(&path, format!("{r:?} is not a registry or namespace: {e}")),
        }
    }
    out
}

fn check_image(cx: &mut Sink<'_>, path: &str, s: &str, sec: &Security) -> Option<ImageRef> {
    let img = match ImageRef::parse(s) {
        Ok(i) => i,
        Err(e) => {
            cx.error(path, e);
            return None;
        }
    };
    let mut ok = true;
    if !sec.allowed_image_registries.is_empty()
        && !sec
            .allowed_image_registries
            .iter()
            .any(|r| img.allowed_by(r))
    {
        cx.error(
            path,
            format!(
                "image {s:?} is not from an allowed registry ({})",
                sec.allowed_image_registries.join(", ")
            ),
        );
        ok = false;
    }
    if sec.require_image_digest && img.digest.is_none() {
        cx.error(
            path,
            format!("image {s:?} is not pinned by digest (security.require_image_digest is on: use ...@sha256:<hex>)"),
        );
        ok = false;
    }
    ok.then_some(img)
}

/// The instance's LLM auth mode: every agent's effective mode (its own
/// `llm_auth`, else `broker.llm_auth`, else api-key) must be the same. The
/// manager's sets the instance's; each grove that differs is an error.
fn check_uniform_auth(
    cx: &mut Sink<'_>,
    broker: LlmAuth,
    m: &RawManager,
    groves: &[RawGrove],
) -> LlmAuth {
    let name = |a: LlmAuth| match a {
        LlmAuth::ApiKey => "api-key",
        LlmAuth::Subscription => "subscription",
    };
    let instance = m.llm_auth.unwrap_or(broker);
    for (i, g) in groves.iter().enumerate() {
        let effective = g.llm_auth.unwrap_or(broker);
        if effective == instance {
            continue;
        }
        let base = cx.item("groves", i);
        let (path, how) = match g.llm_auth {
            Some(_) => (child_key(&base, "llm_auth"), "is"),
            None => (base, "inherits from broker.llm_auth"),
        };
        cx.error(
            &path,
            format!(
                "llm_auth {how} {}, but the manager's is {}: mixing api-key and subscription agents is not allowed",
                name(effective),
                name(instance)
            ),
        );
    }
    instance
}

/// A tool as far as references to it are concerned: declared with a valid,
/// unique name, whatever else may be wrong with it (reported separately).
struct Declared {
    name: String,
    ops: Vec<String>,
}

struct Refs<'a> {
    tools: &'a [Declared],
    identities: &'a HashMap<String, String>,
    auth: LlmAuth,
}

impl Refs<'_> {
    /// Checks a `(tool, op)` reference; reports at `path.tool` / `path.op`.
    fn right(
        &self,
        cx: &mut Sink<'_>,
        path: &str,
        tool: Option<&str>,
        op: Option<&str>,
    ) -> Option<Right> {
        let tool_path = child_key(path, "tool");
        let op_path = child_key(path, "op");
        let (tool, op) = match (tool, op) {
            (Some(t), Some(o)) => (t, o),
            (t, o) => {
                if t.is_none() {
                    cx.missing(&tool_path, "a tool name");
                }
                if o.is_none() {
                    cx.missing(&op_path, "an operation name");
                }
                return None;
            }
        };
        if tool == LLM_TOOL {
            if op != LLM_OP {
                cx.error(
                    &op_path,
                    format!("unknown operation `{op}` of `llm` (the only one is `generate`)"),
                );
                return None;
            }
            if self.auth == LlmAuth::Subscription {
                cx.error(&tool_path, "llm/generate is brokered only in api-key mode; this is a subscription instance");
                return None;
            }
        } else {
            let Some(t) = self.tools.iter().find(|t| t.name == tool) else {
                let known: Vec<&str> = self.tools.iter().map(|t| t.name.as_str()).collect();
                cx.error(
                    &tool_path,
                    format!(
                        "unknown tool `{tool}` (configured in broker.tools: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                return None;
            };
            if !t.ops.iter().any(|o| o == op) {
                cx.error(
                    &op_path,
                    format!(
                        "unknown operation `{op}` of tool `{tool}` (operations: {})",
                        t.ops.join(", ")
                    ),
                );
                return None;
            }
        }
        Some(Right {
            tool: tool.to_owned(),
            op: op.to_owned(),
        })
    }
}

fn build_agent(
    cx: &mut Sink<'_>,
    refs: &Refs<'_>,
    base: &str,
    identity: Option<Name>,
    image: Option<ImageRef>,
    obtain: Option<Vec<RawRight>>,
    delegate: Option<Vec<RawDelegate>>,
) -> Option<Agent> {
    let mut rights = Vec::new();
    if refs.auth == LlmAuth::ApiKey {
        rights.push(Right {
            tool: LLM_TOOL.to_owned(),
            op: LLM_OP.to_owned(),
        });
    }
    let obtain_path = child_key(base, "obtain");
    for (i, r) in obtain.unwrap_or_default().into_iter().enumerate() {
        let path = cx.item(&obtain_path, i);
        if let Some(right) = refs.right(cx, &path, r.tool.as_deref(), r.op.as_deref()) {
            if rights.contains(&right) {
                if right.tool != LLM_TOOL {
                    cx.warning(
                        &path,
                        format!("{}/{} is listed twice", right.tool, right.op),
                    );
                }
            } else {
                rights.push(right);
            }
        }
    }
    let mut delegations = Vec::new();
    let delegate_path = child_key(base, "delegate");
    for (i, d) in delegate.unwrap_or_default().into_iter().enumerate() {
        let path = cx.item(&delegate_path, i);
        let right = refs.right(cx, &path, d.tool.as_deref(), d.op.as_deref());
        let to_path = child_key(&path, "to");
        let Some(to) = d.to else {
            cx.missing(&to_path, "the agents this capability may be delegated to");
            continue;
        };
        if to.is_empty() {
            cx.error(&to_path, "must name at least one agent");
        }
        let mut names = Vec::new();
        for (j, t) in to.iter().enumerate() {
            let tp = cx.item(&to_path, j);
            if !refs.identities.contains_key(t.as_str()) {
                let mut known: Vec<&str> = refs.identities.keys().map(String::as_str).collect();
                known.sort_unstable();
                cx.error(
                    &tp,
                    format!("unknown agent `{t}` (agents: {})", known.join(", ")),
                );
            } else if identity.as_ref().is_some_and(|me| me.as_str() == t) {
                cx.error(&tp, "an agent cannot delegate to itself");
            } else if let Ok(n) = Name::parse(t) {
                names.push(n);
            }
        }
        if let Some(right) = right {
            if !rights.contains(&right) {
                cx.warning(
                    &path,
                    format!(
                        "{}/{} is delegated but not in this agent's obtain: it can only delegate what it holds",
                        right.tool, right.op
                    ),
                );
            }
            delegations.push(Delegation { right, to: names });
        }
    }
    Some(Agent {
        identity: identity?,
        image,
        obtain: rights,
        delegate: delegations,
    })
}

fn build_tools(
    cx: &mut Sink<'_>,
    inp: &Inputs<'_>,
    tree: Option<&Path>,
    raw: Vec<RawTool>,
) -> (Vec<Tool>, Vec<Declared>) {
    let mut declared: Vec<Declared> = Vec::new();
    if raw.len() > MAX_TOOLS {
        cx.error("broker.tools", format!("at most {MAX_TOOLS} tools"));
    }
    let mut out: Vec<Tool> = Vec::new();
    let mut backends: HashMap<std::net::SocketAddr, String> = HashMap::new();
    for (i, t) in raw.into_iter().enumerate() {
        let base = cx.item("broker.tools", i);
        let name_path = child_key(&base, "name");
        let name = required(cx, &name_path, t.name.as_deref(), "the tool's name").and_then(|s| {
            if s == LLM_TOOL {
                cx.error(&name_path, "`llm` is reserved for LLM access");
                return None;
            }
            let n = Name::parse(s).map_err(|e| cx.error(&name_path, e)).ok()?;
            if declared.iter().any(|o| o.name == n.as_str()) {
                cx.error(&name_path, format!("tool `{n}` is defined twice"));
                return None;
            }
            Some(n)
        });

        let cmd_path = child_key(&base, "command");
        let command = match t.command {
            None => {
                cx.missing(&cmd_path, "the argv of the tool's process");
                None
            }
            Some(c) if c.is_empty() => {
                cx.error(&cmd_path, "must name a program (a non-empty argv list)");
                None
            }
            Some(mut c) => {
                let mut ok = true;
                for (j, a) in c.iter().enumerate() {
                    if a.is_empty() || a.contains('\0') {
                        cx.error(
                            &cx.item(&cmd_path, j),
                            "argv elements must be non-empty and free of NUL",
                        );
                        ok = false;
                    }
                }
                // A program named by path runs on the host, from the
                // instance root: never one the agents can rewrite.
                if ok && c[0].contains('/') {
                    let p = &cx.item(&cmd_path, 0);
                    match fs::resolve(&c[0], inp.root, inp.env)
                        .and_then(|given| fs::real_path(&given).map(|real| (given, real)))
                    {
                        Ok((given, real)) => {
                            ok = outside_tree(
                                cx,
                                tree,
                                p,
                                (&given, &real),
                                "agents could replace the program the broker runs on the host",
                            );
                            // `~/` is the config's, not a shell's: the
                            // broker runs what was checked.
                            if c[0].starts_with('~') {
                                c[0] = given.to_string_lossy().into_owned();
                            }
                        }
                        Err(e) => {
                            cx.error(p, e);
                            ok = false;
                        }
                    }
                }
                // An argument naming something in the tree (a script the
                // program runs, say) is the agents' to rewrite: whether the
                // program reads it is the program's business, so a warning.
                if let Some(t) = tree {
                    for (j, a) in c.iter().enumerate().skip(1) {
                        let given = inp.root.join(a);
                        if !a.starts_with('-')
                            && given.symlink_metadata().is_ok()
                            && fs::through_tree(&given, t).is_some()
                        {
                            cx.warning(
                                &cx.item(&cmd_path, j),
                                format!("{a:?} is in the tree: if the tool reads or runs it, agents can rewrite what the broker runs on the host"),
                            );
                        }
                    }
                }
                ok.then_some(c)
            }
        };

        let backend_path = child_key(&base, "backend");
        let transport = t.transport.unwrap_or(Transport::Http);
        let transport_broken = cx.is_broken(&child_key(&base, "transport"));
        let backend = match (transport, t.backend.as_deref()) {
            _ if transport_broken => None,
            (Transport::Http, None) => {
                cx.missing(
                    &backend_path,
                    "the loopback IP:PORT an http tool listens on",
                );
                None
            }
            (Transport::Http, Some(b)) => match values::parse_loopback_addr(b) {
                Ok(a) => {
                    if let Some(first) = backends.get(&a) {
                        cx.error(
                            &backend_path,
                            format!("{a} is already the backend of {first}"),
                        );
                    } else {
                        backends.insert(a, backend_path.clone());
                    }
                    Some(a)
                }
                Err(e) => {
                    cx.error(&backend_path, e);
                    None
                }
            },
            (Transport::Stdio, Some(_)) => {
                cx.error(
                    &backend_path,
                    "a stdio tool has no backend address (remove it, or use transport: http)",
                );
                None
            }
            (Transport::Stdio, None) => None,
        };

        let ops_path = child_key(&base, "operations");
        let mut operations: Vec<Operation> = Vec::new();
        match t.operations {
            None => cx.missing(&ops_path, "the tool's operations (e.g. `[{name: read}]`)"),
            Some(ops) if ops.is_empty() => cx.error(&ops_path, "must list at least one operation"),
            Some(ops) => {
                for (j, o) in ops.into_iter().enumerate() {
                    let op_base = cx.item(&ops_path, j);
                    let np = child_key(&op_base, "name");
                    let Some(n) = required(cx, &np, o.name.as_deref(), "the operation's name")
                    else {
                        continue;
                    };
                    let Ok(n) = OpName::parse(n).map_err(|e| cx.error(&np, e)) else {
                        continue;
                    };
                    if operations.iter().any(|x| x.name == n) {
                        cx.error(&np, format!("operation `{n}` is listed twice"));
                        continue;
                    }
                    if let Some(args) = &o.args {
                        for (k, a) in args.iter().enumerate() {
                            if !is_arg_name(a) {
                                cx.error(
                                    &cx.item(&child_key(&op_base, "args"), k),
                                    format!("{a:?} is not an argument name ([A-Za-z_][A-Za-z0-9_-]{{0,63}})"),
                                );
                            }
                        }
                    }
                    operations.push(Operation {
                        name: n,
                        args: o.args,
                    });
                }
            }
        }

        if let Some(n) = &name {
            declared.push(Declared {
                name: n.to_string(),
                ops: operations.iter().map(|o| o.name.to_string()).collect(),
            });
        }

        let av_path = child_key(&base, "allowed_values");
        let known_args = command.as_deref().and_then(first_party_args);
        let mut allowed_values = BTreeMap::new();
        for (key, vals) in t.allowed_values.unwrap_or_default() {
            let kp = child_key(&av_path, &key);
            if !is_arg_name(&key) {
                cx.error(
                    &kp,
                    format!("{key:?} is not an argument name ([A-Za-z_][A-Za-z0-9_-]{{0,63}})"),
                );
                continue;
            }
            if let Some(known) = known_args
                && !known.contains(&key.as_str())
            {
                cx.error(
                    &kp,
                    format!(
                        "unknown key `{key}`: this tool's arguments are {}",
                        known.join(", ")
                    ),
                );
                continue;
            }
            let undeclared: Vec<&str> = operations
                .iter()
                .filter(|o| o.args.as_ref().is_some_and(|a| !a.contains(&key)))
                .map(|o| o.name.as_str())
                .collect();
            if !undeclared.is_empty() {
                cx.error(
                    &kp,
                    format!(
                        "unknown key `{key}`: not an argument of operation(s) {} (declared in operations[].args)",
                        undeclared.join(", ")
                    ),
                );
                continue;
            }
            if vals.is_empty() {
                cx.error(
                    &kp,
                    "must list at least one value (an empty list would make the tool unusable)",
                );
                continue;
            }
            let mut set = BTreeSet::new();
            for (j, v) in vals.into_iter().enumerate() {
                let vp = cx.item(&kp, j);
                if v.is_empty() || v.len() > MAX_VALUE_LEN || v.chars().any(char::is_control) {
                    cx.error(&vp, format!("values must be 1 to {MAX_VALUE_LEN} characters without control characters"));
                } else if !set.insert(v.clone()) {
                    cx.error(&vp, format!("{v:?} is listed twice"));
                }
            }
            allowed_values.insert(key, set);
        }

        let timeout = duration(
            cx,
            &child_key(&base, "timeout"),
            t.timeout.as_deref(),
            Duration::from_secs(30),
            Duration::from_millis(100),
            Duration::from_secs(3600),
        );
        let transport = match (command, transport, backend) {
            (Some(command), Transport::Http, Some(backend)) => {
                Some(ToolTransport::Http { command, backend })
            }
            (Some(command), Transport::Stdio, _) => Some(ToolTransport::Stdio { command }),
            _ => None,
        };
        if let (Some(name), Some(transport), Some(timeout)) = (name, transport, timeout)
            && !operations.is_empty()
        {
            out.push(Tool {
                name,
                transport,
                operations,
                allowed_values,
                timeout,
            });
        }
    }
    (out, declared)
}

fn is_arg_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphabetic() || b == b'_' || (i > 0 && (b.is_ascii_digit() || b == b'-'))
        })
}

fn port(cx: &mut Sink<'_>, path: &str, v: Option<i64>, default: u16) -> Option<u16> {
    match v {
        // A value of the wrong type was reported where it was read: no
        // default stands in for it (it would only feed false errors).
        None if cx.is_broken(path) => None,
        None => Some(default),
        Some(p) => match u16::try_from(p) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                cx.error(path, format!("{p} is not a port (1-65535)"));
                None
            }
        },
    }
}

fn duration(
    cx: &mut Sink<'_>,
    path: &str,
    v: Option<&str>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Option<Duration> {
    let Some(s) = v else { return Some(default) };
    match parse_duration(s) {
        Ok(d) if d < min || d > max => {
            cx.error(
                path,
                format!(
                    "{s} is out of range ({} to {})",
                    values::format_duration(min),
                    values::format_duration(max)
                ),
            );
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            cx.error(path, e);
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn build_broker(
    cx: &mut Sink<'_>,
    inp: &Inputs<'_>,
    tree: Option<&Path>,
    b: RawBroker,
    tools: &[Tool],
    manager_identity: Option<Name>,
    auth: LlmAuth,
    (jail_port, admin_port): (Option<u16>, Option<u16>),
) -> Option<Broker> {
    let api_key_file = match (auth, b.api_key_file.as_deref()) {
        (LlmAuth::ApiKey, None) => {
            cx.missing(
                "broker.api_key_file",
                "api-key mode (the default) needs broker.api_key_file, the real key the broker injects",
            );
            None
        }
        (LlmAuth::ApiKey, Some(p)) => check_secret(cx, inp, tree, "broker.api_key_file", p),
        (LlmAuth::Subscription, Some(p)) => {
            cx.warning(
                "broker.api_key_file",
                "unused in a subscription instance (agents use the projected OAuth token)",
            );
            check_secret(cx, inp, tree, "broker.api_key_file", p)
        }
        (LlmAuth::Subscription, None) => None,
    };

    let upstream = match HttpUrl::parse(b.upstream.as_deref().unwrap_or(DEFAULT_UPSTREAM)) {
        Ok(u) if !u.https && !u.is_loopback() => {
            cx.error(
                "broker.upstream",
                format!("{u} is plain http to a non-loopback host: the real key would cross the network in the clear (http:// is only for a loopback upstream)"),
            );
            None
        }
        Ok(u) => Some(u),
        Err(e) => {
            cx.error("broker.upstream", e);
            None
        }
    };
    let upstream_ca_file = b.upstream_ca_file.as_deref().and_then(|raw| {
        let path = "broker.upstream_ca_file";
        let p = fs::resolve(raw, inp.root, inp.env)
            .map_err(|e| cx.error(path, e))
            .ok()?;
        let real = fs::real_path(&p).map_err(|e| cx.error(path, e)).ok()?;
        if !outside_tree(
            cx,
            tree,
            path,
            (&p, &real),
            "an agent could plant a CA and read the upstream traffic",
        ) {
            return None;
        }
        let checked = fs::regular_file(&real, fs::CA_FILE_MAX)
            .and_then(|md| fs::not_writable_by_others(&real, &md, inp.env))
            .and_then(|()| {
                let text = std::fs::read_to_string(&real)
                    .map_err(|e| format!("{}: {e}", real.display()))?;
                if text.contains("-----BEGIN CERTIFICATE-----") {
                    Ok(())
                } else {
                    Err(format!("{} holds no PEM certificate", real.display()))
                }
            });
        match checked {
            Ok(()) => Some(real),
            Err(e) => {
                cx.error(path, e);
                None
            }
        }
    });

    let bind = match b.bind.as_deref() {
        None => Some(IpAddr::from([127, 0, 0, 1])),
        Some(s) => values::parse_ip(s)
            .map_err(|e| cx.error("broker.bind", e))
            .ok(),
    };
    if let Some(ip) = bind.filter(|ip| !ip.is_loopback()) {
        cx.warning(
            "broker.bind",
            format!("the jail listener will be reachable from the network on {ip} (mTLS is still required; the backends reach a loopback broker through their host alias)"),
        );
    }
    let admin_bind = match b.admin_bind.as_deref() {
        None => Some(IpAddr::from([127, 0, 0, 1])),
        Some(s) => match values::parse_ip(s) {
            Ok(ip) if ip.is_loopback() => Some(ip),
            Ok(ip) => {
                cx.error(
                    "broker.admin_bind",
                    format!("{ip} is not a loopback address: the admin API is unauthenticated and must bind 127.0.0.0/8 or ::1"),
                );
                None
            }
            Err(e) => {
                cx.error("broker.admin_bind", e);
                None
            }
        },
    };
    if let (Some(j), Some(a)) = (jail_port, admin_port) {
        if j == a {
            let path = if b.admin_port.is_some() {
                "broker.admin_port"
            } else {
                "broker.jail_port"
            };
            cx.error(path, format!("jail_port and admin_port are both {j}"));
        }
        for t in tools {
            if let ToolTransport::Http { backend, .. } = &t.transport
                && (backend.port() == j || backend.port() == a)
            {
                cx.error(
                    "broker.tools",
                    format!("tool `{}` backend {backend} uses a broker port", t.name),
                );
            }
        }
    }

    let grant_ttl = duration(
        cx,
        "broker.grant_ttl",
        b.grant_ttl.as_deref(),
        DEFAULT_GRANT_TTL,
        Duration::from_secs(1),
        Duration::from_secs(30 * 86_400),
    );
    let upstream_header_timeout = duration(
        cx,
        "broker.upstream_header_timeout",
        b.upstream_header_timeout.as_deref(),
        DEFAULT_UPSTREAM_HEADER_TIMEOUT,
        Duration::from_secs(1),
        Duration::from_secs(3600),
    );
    let ticket_ttl = duration(
        cx,
        "broker.ticket_ttl",
        b.ticket_ttl.as_deref(),
        DEFAULT_TICKET_TTL,
        Duration::from_secs(1),
        Duration::from_secs(86_400),
    );

    let state_dir = {
        let path = "broker.state_dir";
        let raw = b.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR);
        let resolved = if raw.starts_with('~') || Path::new(raw).is_absolute() {
            fs::resolve(raw, inp.root, inp.env)
                .and_then(|p| fs::real_path(&p).map(|real| (p, real)))
                .map_err(|e| cx.error(path, e))
                .ok()
        } else {
            fs::confined_relative(raw)
                .and_then(|rel| {
                    if rel.as_os_str().is_empty() {
                        Err("must not be the instance root itself".to_owned())
                    } else {
                        fs::confined_real(inp.root, &rel).map(|real| (inp.root.join(rel), real))
                    }
                })
                .map_err(|e| cx.error(path, e))
                .ok()
        };
        resolved.and_then(|(given, real)| {
            if !outside_tree(
                cx,
                tree,
                path,
                (&given, &real),
                "agents could read the CA key and forge identities",
            ) {
                return None;
            }
            if fs::within(inp.root, &real) {
                cx.error(path, "must not contain the instance root");
                return None;
            }
            fs::state_dir(&real, inp.env)
                .map_err(|e| cx.error(path, e))
                .ok()?;
            Some(real)
        })
    };

    let rl = b.rate_limits.unwrap_or_default();
    let llm = limit(cx, "broker.rate_limits.llm", rl.llm, DEFAULT_LLM_LIMIT);
    let tools_limit = limit(
        cx,
        "broker.rate_limits.tools",
        rl.tools,
        DEFAULT_TOOLS_LIMIT,
    );
    let control = limit(
        cx,
        "broker.rate_limits.control",
        rl.control,
        DEFAULT_CONTROL_LIMIT,
    );
    let llm_tokens = rl.llm_tokens.and_then(|t| {
        let p = "broker.rate_limits.llm_tokens";
        let tokens = match t.tokens {
            None => {
                cx.missing(&child_key(p, "tokens"), "the token budget per window");
                None
            }
            Some(n) if n < 1 => {
                cx.error(&child_key(p, "tokens"), "must be at least 1");
                None
            }
            Some(n) => u64::try_from(n).ok(),
        };
        let window = match t.window.as_deref() {
            None => {
                cx.missing(&child_key(p, "window"), "the budget window (e.g. 1h)");
                None
            }
            Some(w) => duration(
                cx,
                &child_key(p, "window"),
                Some(w),
                Duration::ZERO,
                Duration::from_secs(1),
                Duration::from_secs(31 * 86_400),
            ),
        };
        Some(TokenBudget {
            tokens: tokens?,
            window: window?,
        })
    });

    let tel = b.telemetry.unwrap_or_default();
    let otlp_endpoint = tel.otlp_endpoint.as_deref().and_then(|s| {
        HttpUrl::parse(s)
            .map_err(|e| cx.error("broker.telemetry.otlp_endpoint", e))
            .ok()
    });
    let service_name = tel.service_name.and_then(|s| {
        if s.is_empty() || s.len() > 128 || s.chars().any(char::is_control) {
            cx.error(
                "broker.telemetry.service_name",
                "must be 1 to 128 characters without control characters",
            );
            None
        } else {
            Some(s)
        }
    });
    let audit_file = match tel.audit_file.as_deref() {
        None => state_dir.as_ref().map(|d| d.join("audit.jsonl")),
        Some(raw) => {
            let path = "broker.telemetry.audit_file";
            fs::resolve(raw, inp.root, inp.env)
                .and_then(|p| fs::real_path(&p).map(|real| (p, real)))
                .map_err(|e| cx.error(path, e))
                .ok()
                .filter(|(given, real)| {
                    outside_tree(
                        cx,
                        tree,
                        path,
                        (given, real),
                        "agents could rewrite the audit trail",
                    )
                })
                .map(|(_, real)| real)
        }
    };

    Some(Broker {
        api_key_file,
        upstream: upstream?,
        upstream_ca_file,
        upstream_header_timeout: upstream_header_timeout?,
        bind: bind?,
        jail_port: jail_port?,
        admin_bind: admin_bind?,
        admin_port: admin_port?,
        grant_ttl: grant_ttl?,
        ticket_ttl: ticket_ttl?,
        manager_identity: manager_identity?,
        state_dir: state_dir?,
        tools: tools.to_vec(),
        rate_limits: RateLimits {
            llm: llm?,
            tools: tools_limit?,
            control: control?,
            llm_tokens,
        },
        telemetry: Telemetry {
            otlp_endpoint,
            otlp_protocol: tel.otlp_protocol,
            service_name,
            audit_file: audit_file?,
        },
    })
}

fn limit(cx: &mut Sink<'_>, path: &str, raw: Option<RawLimit>, default: Limit) -> Option<Limit> {
    let Some(raw) = raw else { return Some(default) };
    let mut field = |name: &str, v: Option<i64>, d: u32, max: i64| -> Option<u32> {
        match v {
            None => Some(d),
            Some(n) if n >= 1 && n <= max => u32::try_from(n).ok(),
            Some(n) => {
                cx.error(
                    &child_key(path, name),
                    format!("{n} is out of range (1 to {max})"),
                );
                None
            }
        }
    };
    Some(Limit {
        per_minute: field("per_minute", raw.per_minute, default.per_minute, 1_000_000)?,
        burst: field("burst", raw.burst, default.burst, 100_000)?,
        max_concurrent: field(
            "max_concurrent",
            raw.max_concurrent,
            default.max_concurrent,
            10_000,
        )?,
    })
}

fn check_allow_ports(
    cx: &mut Sink<'_>,
    ports: Vec<i64>,
    (jail_port, admin_port): (Option<u16>, Option<u16>),
    tools: &[Tool],
) -> Vec<u16> {
    let mut out = Vec::new();
    for (i, p) in ports.into_iter().enumerate() {
        let path = cx.item("manager.allow_ports", i);
        let Some(port) = u16::try_from(p).ok().filter(|p| *p > 0) else {
            cx.error(&path, format!("{p} is not a port (1-65535)"));
            continue;
        };
        if out.contains(&port) {
            cx.warning(&path, format!("port {port} is listed twice"));
            continue;
        }
        {
            if Some(port) == admin_port {
                cx.error(
                    &path,
                    format!("{port} is the broker's admin port: the unauthenticated admin API must never be reachable from the jail"),
                );
                continue;
            }
            if Some(port) == jail_port {
                cx.warning(
                    &path,
                    format!("{port} is the broker's jail port, which is always reachable"),
                );
            }
            for t in tools {
                if let ToolTransport::Http { backend, .. } = &t.transport
                    && backend.port() == port
                {
                    cx.warning(
                        &path,
                        format!(
                            "{port} is the backend of tool `{}`: agents can reach it directly, bypassing the broker's capability checks",
                            t.name
                        ),
                    );
                }
            }
        }
        out.push(port);
    }
    out
}
