//! Capability tokens: Biscuit mint, offline attenuation, verification and
//! authorization, and the proof that a delegation is no wider than its
//! parent. Pure: the caller supplies the clock, the epoch and the
//! revocation list.
//!
//! The authority block of a token the broker mints directly carries only
//! facts (no rules, no checks); a delegated token's may also carry the
//! checks its parent's holder appended (never facts or rules from them):
//!
//! ```text
//! holder("grove-a");                 // the certificate CN it is bound to
//! right("db", "read");               // one per granted (tool, op)
//! pin("db", "read", "table", "users"); // one per pinned constraint
//! epoch(3);
//! expires(2026-11-24T18:00:00Z);
//! delegated_by("manager");           // delegated tokens only
//! ancestor("<token id hex>");        // delegated tokens: the parent chain
//! ```
//!
//! The authorizer supplies `peer`, `time`, `current_epoch`, `req(tool, op)`
//! and `args(map)` (every string argument of the request: always present,
//! so a missing argument reads as `null` and fails its pin), then checks:
//! holder == peer, epoch == current, not expired, `(tool, op)` granted,
//! and every pin equal to its argument. Revocation ids (one per block, and
//! the ancestors') are checked in Rust before any Datalog runs. Request
//! data only ever enters Datalog as parameters, never by formatting.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use biscuit_auth::builder::{MapKey, Term};
use biscuit_auth::error::{FailedCheck, Logic, Token as BiscuitError};
use biscuit_auth::{
    AuthorizerBuilder, AuthorizerLimits, Biscuit, KeyPair, PrivateKey, UnverifiedBiscuit,
};

/// Largest token accepted, in base64 characters (a fresh token is ~500;
/// each attenuation block adds ~300).
pub const MAX_TOKEN_CHARS: usize = 8 * 1024;
/// Most blocks accepted: the authority block and up to 7 attenuations.
pub const MAX_BLOCKS: usize = 8;
/// Most grants in one token.
pub const MAX_GRANTS: usize = 64;
/// Most string arguments judged for one request; more are refused.
pub const MAX_ARGS: usize = 64;
/// Longest argument key or value judged; a request with a longer one is
/// refused (never truncated).
pub const MAX_ARG_LEN: usize = 4096;

/// Datalog run limits: generous for our tiny programs, but bounded, and
/// well above the 1 ms default that flakes under load.
const LIMITS: AuthorizerLimits = AuthorizerLimits {
    max_facts: 2000,
    max_iterations: 200,
    max_time: Duration::from_millis(200),
};

/// The authorizer's policy. The order of the checks is the order of
/// [`CHECK_REASONS`].
const POLICY: &str = r#"
check if holder($h), peer($h);
check if epoch($e), current_epoch($e);
check if expires($x), time($t), $t < $x;
check if req($t, $o), right($t, $o);
reject if req($t, $o), pin($t, $o, $k, $v), args($m), $m.get($k) != $v;
check if args($m);
allow if true;
"#;

const CHECK_REASONS: [Denial; 6] = [
    Denial::WrongHolder,
    Denial::StaleEpoch,
    Denial::Expired,
    Denial::NotGranted,
    Denial::ConstraintMismatch,
    Denial::Malformed,
];

/// The broker's Ed25519 root key.
pub struct RootKey(KeyPair);

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootKey(..)")
    }
}

impl RootKey {
    pub fn generate() -> RootKey {
        RootKey(KeyPair::new())
    }

    /// The private key as a PEM (PKCS#8) document.
    pub fn to_pem(&self) -> Result<String, TokenError> {
        self.0
            .to_private_key_pem()
            .map(|z| z.to_string())
            .map_err(|e| TokenError::Key(e.to_string()))
    }

    pub fn from_pem(pem: &str) -> Result<RootKey, TokenError> {
        PrivateKey::from_pem(pem)
            .map(|k| RootKey(KeyPair::from(&k)))
            .map_err(|e| TokenError::Key(e.to_string()))
    }

    pub fn public(&self) -> PublicKey {
        self.0.public()
    }
}

/// The id of a token (or of one of its blocks): the hex of the block's
/// revocation identifier (its signature). A token's id is its authority
/// block's; revoking it kills the token, every attenuation of it and every
/// token delegated from it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenId(String);

impl TokenId {
    pub fn from_bytes(b: &[u8]) -> TokenId {
        TokenId(crate::hex::encode(b))
    }

    /// Parses a hex id (lowercase or uppercase), normalized to lowercase.
    pub fn parse(s: &str) -> Option<TokenId> {
        let ok = !s.is_empty()
            && s.len() <= 256
            && s.len().is_multiple_of(2)
            && s.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| TokenId(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One granted right with its pinned constraints.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub tool: String,
    pub op: String,
    #[serde(default)]
    pub constraints: BTreeMap<String, String>,
}

/// What to mint.
#[derive(Clone, Debug)]
pub struct Mint<'a> {
    pub holder: &'a str,
    pub grants: &'a [Grant],
    pub epoch: u64,
    pub expires_at: SystemTime,
    /// For a delegated token: the delegator and the chain of ancestor ids
    /// (parent first).
    pub delegation: Option<(&'a str, &'a [TokenId])>,
    /// Checks to carry over (a delegation inherits its parent's
    /// holder-appended checks; see [`Verified::holder_checks`]). Checks can
    /// only restrict.
    pub inherit_checks: &'a [HolderCheck],
}

#[derive(Clone, Debug)]
pub struct Minted {
    pub token: String,
    pub token_id: TokenId,
    pub expires_at: SystemTime,
}

/// Why a token was refused. The `Display` is one line, safe to send back:
/// it never contains the token.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Denial {
    TooLarge,
    TooManyBlocks,
    Malformed,
    BadSignature,
    Revoked,
    WrongHolder,
    StaleEpoch,
    Expired,
    NotGranted,
    ConstraintMismatch,
    AttenuationCheck,
    Delegated,
    RequestTooLarge,
    TooComplex,
    NonStringArgument,
    /// The broker verifies only so many new tokens per agent per second
    /// (a refusal of the broker's, not a fault of the token).
    Throttled,
}

impl Denial {
    /// A stable short code for audit records and responses.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::TooLarge => "token_too_large",
            Denial::TooManyBlocks => "token_too_many_blocks",
            Denial::Malformed => "token_malformed",
            Denial::BadSignature => "token_bad_signature",
            Denial::Revoked => "token_revoked",
            Denial::WrongHolder => "token_wrong_holder",
            Denial::StaleEpoch => "token_stale_epoch",
            Denial::Expired => "token_expired",
            Denial::NotGranted => "not_granted",
            Denial::ConstraintMismatch => "constraint_mismatch",
            Denial::AttenuationCheck => "attenuation_check_failed",
            Denial::Delegated => "delegated_token",
            Denial::RequestTooLarge => "request_arguments_too_large",
            Denial::TooComplex => "token_too_complex",
            Denial::NonStringArgument => "non_string_argument",
            Denial::Throttled => "rate_limited",
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Denial::TooLarge => "the token is larger than the broker accepts",
            Denial::TooManyBlocks => "the token has more blocks than the broker accepts",
            Denial::Malformed => "the token is not a well-formed capability token",
            Denial::BadSignature => "the token's signature chain does not verify",
            Denial::Revoked => "the token (or its holder, or a token it derives from) is revoked",
            Denial::WrongHolder => "the token is bound to another identity",
            Denial::StaleEpoch => "the token is from another epoch",
            Denial::Expired => "the token has expired",
            Denial::NotGranted => "the token does not grant this tool and operation",
            Denial::ConstraintMismatch => "an argument does not match the value the token pins",
            Denial::AttenuationCheck => {
                "a check added to the token by its holder refuses this request"
            }
            Denial::Delegated => "a delegated token cannot be delegated again",
            Denial::RequestTooLarge => {
                "the request has more or longer arguments than the broker judges"
            }
            Denial::TooComplex => {
                "a block appended to the token holds facts, rules or checks beyond what the broker evaluates (checks only, over req, args, time, peer, holder, epoch, current_epoch, expires and delegated_by, within limits)"
            }
            Denial::NonStringArgument => {
                "the token carries its holder's checks, and an argument that is not a string cannot be judged by them"
            }
            Denial::Throttled => {
                "too many new capability tokens from this agent: the broker verifies a few a second; retry shortly"
            }
        })
    }
}

/// Minting or key handling failed (a broker-side fault, not a denial).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("root key: {0}")]
    Key(String),
    #[error("cannot build the token: {0}")]
    Build(String),
    #[error("too many grants ({0}; at most {MAX_GRANTS})")]
    TooManyGrants(usize),
}

/// A token whose signature chain verified, with its authority facts read.
#[derive(Clone)]
pub struct Verified {
    biscuit: Biscuit,
    pub token_id: TokenId,
    /// Every block's revocation id, authority first.
    pub block_ids: Vec<TokenId>,
    pub holder: String,
    pub epoch: u64,
    pub expires_at: SystemTime,
    pub delegated_by: Option<String>,
    pub ancestors: Vec<TokenId>,
    pub grants: Vec<Grant>,
    /// Whether any block carries a check (a holder's own, or one a
    /// delegated token inherited): such a token is judged on every
    /// argument, and refuses one its checks cannot see.
    pub carries_checks: bool,
}

impl fmt::Debug for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verified")
            .field("token_id", &self.token_id)
            .field("holder", &self.holder)
            .field("epoch", &self.epoch)
            .field("blocks", &self.block_ids.len())
            .finish_non_exhaustive()
    }
}

/// A request to authorize.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// The verified peer identity (certificate CN).
    pub peer: &'a str,
    pub now: SystemTime,
    pub epoch: u64,
    pub tool: &'a str,
    pub op: &'a str,
    /// The request's string arguments (others cannot satisfy a pin).
    pub args: &'a BTreeMap<String, String>,
}

fn params(pairs: Vec<(&str, Term)>) -> HashMap<String, Term> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn build_err(e: BiscuitError) -> TokenError {
    TokenError::Build(e.to_string())
}

/// Mints a token. Every value enters the authority block as a parameter.
pub fn mint(root: &RootKey, m: &Mint<'_>) -> Result<Minted, TokenError> {
    if m.grants.len() > MAX_GRANTS {
        return Err(TokenError::TooManyGrants(m.grants.len()));
    }
    // Whole seconds: what Datalog stores is what the caller is told.
    let expires_at = UNIX_EPOCH + Duration::from_secs(unix_secs(m.expires_at));
    let mut b = Biscuit::builder()
        .code_with_params(
            "holder({holder}); epoch({epoch}); expires({expires});",
            params(vec![
                ("holder", m.holder.into()),
                (
                    "epoch",
                    Term::Integer(
                        i64::try_from(m.epoch)
                            .map_err(|_| TokenError::Build("epoch out of range".into()))?,
                    ),
                ),
                ("expires", expires_at.into()),
            ]),
            HashMap::new(),
        )
        .map_err(build_err)?;
    for g in m.grants {
        b = b
            .code_with_params(
                "right({tool}, {op});",
                params(vec![
                    ("tool", g.tool.as_str().into()),
                    ("op", g.op.as_str().into()),
                ]),
                HashMap::new(),
            )
            .map_err(build_err)?;
        for (k, v) in &g.constraints {
            b = b
                .code_with_params(
                    "pin({tool}, {op}, {key}, {value});",
                    params(vec![
                        ("tool", g.tool.as_str().into()),
                        ("op", g.op.as_str().into()),
                        ("key", k.as_str().into()),
                        ("value", v.as_str().into()),
                    ]),
                    HashMap::new(),
                )
                .map_err(build_err)?;
        }
    }
    if let Some((by, ancestors)) = m.delegation {
        b = b
            .code_with_params(
                "delegated_by({by});",
                params(vec![("by", by.into())]),
                HashMap::new(),
            )
            .map_err(build_err)?;
        for a in ancestors {
            b = b
                .code_with_params(
                    "ancestor({id});",
                    params(vec![("id", a.as_str().into())]),
                    HashMap::new(),
                )
                .map_err(build_err)?;
        }
    }
    for c in m.inherit_checks {
        b = b.check(c.clone()).map_err(build_err)?;
    }
    let biscuit = b.build(&root.0).map_err(build_err)?;
    let token = biscuit.to_base64().map_err(build_err)?;
    let ids = biscuit.revocation_identifiers();
    let token_id = ids
        .first()
        .map(|b| TokenId::from_bytes(b))
        .ok_or_else(|| TokenError::Build("no authority block".into()))?;
    Ok(Minted {
        token,
        token_id,
        expires_at,
    })
}

/// Whether `token` has the shape of a capability token: within the caps,
/// base64url, and parsing as a Biscuit ([`parse`], as [`verify`] does).
/// Nothing is verified: this only tells a token from some other
/// credential (a placeholder API key).
pub fn parses(token: &str) -> bool {
    parse(token).is_ok()
}

/// A token's caps and parse, before any key is used: its size, its
/// alphabet, its Biscuit form, its block count.
fn parse(token: &str) -> Result<UnverifiedBiscuit, Denial> {
    if token.len() > MAX_TOKEN_CHARS {
        return Err(Denial::TooLarge);
    }
    if token.is_empty()
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
    {
        return Err(Denial::Malformed);
    }
    let unverified = UnverifiedBiscuit::from_base64(token).map_err(|_| Denial::Malformed)?;
    if unverified.block_count() > MAX_BLOCKS {
        return Err(Denial::TooManyBlocks);
    }
    Ok(unverified)
}

/// The predicates a holder's checks may name: the request and the token's
/// single-valued facts. Each matches at most one fact, so no holder query
/// joins over many (`right`, `pin` and `ancestor` can hold dozens).
const HOLDER_PREDICATES: &[&str] = &[
    "req",
    "args",
    "time",
    "peer",
    "holder",
    "epoch",
    "current_epoch",
    "expires",
    "delegated_by",
];
/// Queries (each `or` alternative of each check) across appended blocks.
pub const MAX_HOLDER_QUERIES: usize = 32;
/// Expression operations across appended blocks, closures' included.
pub const MAX_HOLDER_OPS: usize = 256;
/// Regular expressions (compiled at each evaluation) across appended blocks.
pub const MAX_HOLDER_REGEXES: usize = 8;

/// What a holder may append, checked before any of it is evaluated
/// checks only (a block's facts and rules would run inside the broker's
/// evaluation, where one rule can join a fact set with itself until memory
/// or time runs out, and delegation could not carry their meaning), over
/// [`HOLDER_PREDICATES`], no closure inside a closure (`&&` and `||`, which
/// Biscuit compiles to closures without parameters, run at most once and do
/// not count), no regular expression inside a closure, and at most
/// [`MAX_HOLDER_QUERIES`] queries, [`MAX_HOLDER_OPS`] operations (each
/// element of a literal set, array or map counted) and
/// [`MAX_HOLDER_REGEXES`] regular expressions in all. Biscuit's own limits
/// are checked only between evaluation steps, too late for a single join;
/// these keep every step small.
///
/// The blocks are read from the token's own bytes (the protobuf Biscuit
/// evaluates), never from a printout: names and strings print unescaped,
/// so a printout can be made to parse as something else. Blocks from
/// index `from` on are checked. Returns whether any block carries a check.
fn check_blocks(biscuit: &Biscuit, from: usize) -> Result<bool, Denial> {
    use biscuit_auth::format::schema;
    use prost::Message as _;
    let bytes = biscuit.to_vec().map_err(|_| Denial::Malformed)?;
    let proto = schema::Biscuit::decode(bytes.as_slice()).map_err(|_| Denial::Malformed)?;
    let decode = |b: &[u8]| schema::Block::decode(b).map_err(|_| Denial::Malformed);
    let authority = decode(&proto.authority.block)?;
    let mut carries_checks = !authority.checks.is_empty();
    // The token's symbols after the default ones: the authority block's,
    // then each first-party block's in turn (a third-party block has its
    // own table).
    let mut symbols = authority.symbols;
    let mut budget = Budget::default();
    for (n, signed) in proto.blocks.iter().enumerate() {
        let block = decode(&signed.block)?;
        carries_checks |= !block.checks.is_empty();
        let own;
        let table: &[String] = if signed.external_signature.is_some() {
            own = block.symbols.clone();
            &own
        } else {
            symbols.extend(block.symbols.iter().cloned());
            &symbols
        };
        if n + 1 < from {
            continue;
        }
        if !block.facts.is_empty() || !block.rules.is_empty() {
            return Err(Denial::TooComplex);
        }
        for q in block.checks.iter().flat_map(|c| &c.queries) {
            budget.queries += 1;
            for p in &q.body {
                let name = symbol(table, p.name).ok_or(Denial::Malformed)?;
                if !HOLDER_PREDICATES.contains(&name.as_str()) {
                    return Err(Denial::TooComplex);
                }
            }
            for e in &q.expressions {
                budget.walk(&e.ops, 0)?;
            }
        }
    }
    budget.within()?;
    Ok(carries_checks)
}

/// Symbol `i` of a block whose custom symbols are `table`.
fn symbol(table: &[String], i: u64) -> Option<String> {
    const OFFSET: u64 = 1024;
    if i >= OFFSET {
        table.get(usize::try_from(i - OFFSET).ok()?).cloned()
    } else {
        biscuit_auth::datalog::SymbolTable::new()
            .get_symbol(i)
            .map(str::to_owned)
    }
}

/// The work counted against [`check_blocks`]'s limits.
#[derive(Default)]
struct Budget {
    queries: usize,
    ops: usize,
    regexes: usize,
}

impl Budget {
    fn within(&self) -> Result<(), Denial> {
        if self.queries > MAX_HOLDER_QUERIES
            || self.ops > MAX_HOLDER_OPS
            || self.regexes > MAX_HOLDER_REGEXES
        {
            return Err(Denial::TooComplex);
        }
        Ok(())
    }

    /// Counts `ops`, `depth` closures (with parameters) deep.
    fn walk(
        &mut self,
        ops: &[biscuit_auth::format::schema::Op],
        depth: usize,
    ) -> Result<(), Denial> {
        use biscuit_auth::format::schema::op::Content;
        use biscuit_auth::format::schema::op_binary::Kind;
        for op in ops {
            self.ops += 1;
            match &op.content {
                Some(Content::Value(t)) => self.ops += elements(t),
                Some(Content::Binary(b)) if b.kind == Kind::Regex as i32 => {
                    // Compiled at each evaluation: never once per element.
                    if depth > 0 {
                        return Err(Denial::TooComplex);
                    }
                    self.regexes += 1;
                }
                Some(Content::Closure(c)) => {
                    let depth = depth + usize::from(!c.params.is_empty());
                    if depth > 1 {
                        return Err(Denial::TooComplex);
                    }
                    self.walk(&c.ops, depth)?;
                }
                _ => {}
            }
            self.within()?;
        }
        Ok(())
    }
}

/// The elements of a literal set, array or map, nested ones included.
fn elements(t: &biscuit_auth::format::schema::Term) -> usize {
    use biscuit_auth::format::schema::term::Content;
    match &t.content {
        Some(Content::Set(s)) => s.set.iter().map(|e| 1 + elements(e)).sum(),
        Some(Content::Array(a)) => a.array.iter().map(|e| 1 + elements(e)).sum(),
        Some(Content::Map(m)) => m.entries.iter().map(|e| 1 + elements(&e.value)).sum(),
        _ => 0,
    }
}

/// Parses and verifies a token: size and block caps first ([`parse`]),
/// then the signature chain, then the authority facts. No request is
/// judged here.
pub fn verify(root: &PublicKey, token: &str) -> Result<Verified, Denial> {
    let unverified = parse(token)?;
    let biscuit = unverified.verify(*root).map_err(|_| Denial::BadSignature)?;
    // Before any authorizer runs a holder's Datalog.
    let carries_checks = check_blocks(&biscuit, 1)?;
    let block_ids: Vec<TokenId> = biscuit
        .revocation_identifiers()
        .iter()
        .map(|b| TokenId::from_bytes(b))
        .collect();
    let token_id = block_ids.first().cloned().ok_or(Denial::Malformed)?;

    // Read the authority facts (the default scope: authority block only,
    // nothing a holder appended).
    let mut reader = AuthorizerBuilder::new()
        .set_limits(LIMITS)
        .build(&biscuit)
        .map_err(|_| Denial::Malformed)?;
    let one = |v: Vec<(String,)>| -> Result<String, Denial> {
        match v.as_slice() {
            [(s,)] => Ok(s.clone()),
            _ => Err(Denial::Malformed),
        }
    };
    let holder = one(reader
        .query("data($h) <- holder($h)")
        .map_err(|_| Denial::Malformed)?)?;
    let epochs: Vec<(i64,)> = reader
        .query("data($e) <- epoch($e)")
        .map_err(|_| Denial::Malformed)?;
    let epoch = match epochs.as_slice() {
        [(e,)] => u64::try_from(*e).map_err(|_| Denial::Malformed)?,
        _ => return Err(Denial::Malformed),
    };
    let expiries: Vec<(SystemTime,)> = reader
        .query("data($x) <- expires($x)")
        .map_err(|_| Denial::Malformed)?;
    let expires_at = match expiries.as_slice() {
        [(x,)] => *x,
        _ => return Err(Denial::Malformed),
    };
    let delegators: Vec<(String,)> = reader
        .query("data($d) <- delegated_by($d)")
        .map_err(|_| Denial::Malformed)?;
    let delegated_by = match delegators.as_slice() {
        [] => None,
        [(d,)] => Some(d.clone()),
        _ => return Err(Denial::Malformed),
    };
    let ancestors: Vec<(String,)> = reader
        .query("data($a) <- ancestor($a)")
        .map_err(|_| Denial::Malformed)?;
    let ancestors = ancestors
        .into_iter()
        .map(|(a,)| TokenId::parse(&a).ok_or(Denial::Malformed))
        .collect::<Result<Vec<_>, _>>()?;
    let rights: Vec<(String, String)> = reader
        .query("data($t, $o) <- right($t, $o)")
        .map_err(|_| Denial::Malformed)?;
    let pins: Vec<(String, String, String, String)> = reader
        .query("data($t, $o, $k, $v) <- pin($t, $o, $k, $v)")
        .map_err(|_| Denial::Malformed)?;
    let mut grants: Vec<Grant> = rights
        .into_iter()
        .map(|(tool, op)| {
            let constraints = pins
                .iter()
                .filter(|(t, o, _, _)| *t == tool && *o == op)
                .map(|(_, _, k, v)| (k.clone(), v.clone()))
                .collect();
            Grant {
                tool,
                op,
                constraints,
            }
        })
        .collect();
    grants.sort();
    Ok(Verified {
        biscuit,
        token_id,
        block_ids,
        holder,
        epoch,
        expires_at,
        delegated_by,
        ancestors,
        grants,
        carries_checks,
    })
}

impl Verified {
    /// Every id whose revocation kills this token: each block's and each
    /// ancestor's.
    pub fn revocation_ids(&self) -> impl Iterator<Item = &TokenId> {
        self.block_ids.iter().chain(self.ancestors.iter())
    }

    /// The checks every use of the token needs besides the request itself:
    /// revocation, holder, epoch, expiry. Cheap (no Datalog); run them on
    /// every call, cache or not.
    pub fn check_standing(
        &self,
        peer: &str,
        now: SystemTime,
        epoch: u64,
        is_revoked: impl Fn(&TokenId) -> bool,
    ) -> Result<(), Denial> {
        if self.revocation_ids().any(is_revoked) {
            return Err(Denial::Revoked);
        }
        if self.holder != peer {
            return Err(Denial::WrongHolder);
        }
        if self.epoch != epoch {
            return Err(Denial::StaleEpoch);
        }
        if now >= self.expires_at {
            return Err(Denial::Expired);
        }
        Ok(())
    }

    /// Judges a request in Datalog: the authorizer's checks over the
    /// authority block, plus every check a holder appended. Call
    /// [`Verified::check_standing`] first.
    pub fn authorize(&self, req: &Request<'_>) -> Result<(), Denial> {
        // Refuse, never truncate: a dropped argument would read as absent,
        // and a holder's `reject if` on it would then fail open.
        if req.args.len() > MAX_ARGS
            || req
                .args
                .iter()
                .any(|(k, v)| v.len() > MAX_ARG_LEN || k.len() > MAX_ARG_LEN)
        {
            return Err(Denial::RequestTooLarge);
        }
        let mut map = BTreeMap::new();
        for (k, v) in req.args {
            map.insert(MapKey::Str(k.clone()), Term::Str(v.clone()));
        }
        let epoch = i64::try_from(req.epoch).map_err(|_| Denial::Malformed)?;
        let facts = params(vec![
            ("peer", req.peer.into()),
            ("now", req.now.into()),
            ("epoch", Term::Integer(epoch)),
            ("tool", req.tool.into()),
            ("op", req.op.into()),
            ("args", Term::Map(map)),
        ]);
        let mut authorizer = AuthorizerBuilder::new()
            .code_with_params(
                "peer({peer}); time({now}); current_epoch({epoch}); req({tool}, {op}); args({args});",
                facts,
                HashMap::new(),
            )
            .and_then(|b| b.code(POLICY))
            .map_err(|_| Denial::Malformed)?
            .set_limits(LIMITS)
            .build(&self.biscuit)
            .map_err(|_| Denial::Malformed)?;
        match authorizer.authorize() {
            Ok(_) => Ok(()),
            Err(BiscuitError::FailedLogic(Logic::Unauthorized { checks, .. })) => {
                Err(denial_of(&checks))
            }
            Err(BiscuitError::FailedLogic(Logic::NoMatchingPolicy { checks })) => {
                Err(denial_of(&checks))
            }
            Err(_) => Err(Denial::Malformed),
        }
    }

    /// Standing and request together.
    pub fn authorize_all(
        &self,
        req: &Request<'_>,
        is_revoked: impl Fn(&TokenId) -> bool,
    ) -> Result<(), Denial> {
        self.check_standing(req.peer, req.now, req.epoch, is_revoked)?;
        self.authorize(req)
    }

    /// The checks the holder appended (every block after the authority
    /// block), to be carried into a delegated token. Only checks: facts and
    /// rules of appended blocks never become authority facts. A block that
    /// does not read back is refused (fail closed).
    pub fn holder_checks(&self) -> Result<Vec<HolderCheck>, Denial> {
        let mut out = Vec::new();
        for i in 1..self.biscuit.block_count() {
            let src = self
                .biscuit
                .print_block_source(i)
                .map_err(|_| Denial::Malformed)?;
            let block = biscuit_auth::builder::BlockBuilder::new()
                .code(&src)
                .map_err(|_| Denial::Malformed)?;
            out.extend(block.checks);
        }
        // The reparse of a printout is what the child will carry, and a
        // printout can parse as something other than what it printed
        // (names and strings print unescaped): bound exactly what will be
        // carried, appended to a copy of this token, with the same checks.
        let mut probe = biscuit_auth::builder::BlockBuilder::new();
        for c in &out {
            probe = probe.check(c.clone()).map_err(|_| Denial::Malformed)?;
        }
        let probe = self.biscuit.append(probe).map_err(|_| Denial::Malformed)?;
        check_blocks(&probe, self.biscuit.block_count())?;
        Ok(out)
    }

    /// Proves that `grants` are no wider than this token, as used by its
    /// holder `delegator` now: each grant's values are replayed as a request
    /// against this token, its holder's own appended checks included. Also
    /// returns the latest expiry the child may have (never later than this
    /// token's, nor than any time bound the holder appended).
    pub fn prove_covers(
        &self,
        delegator: &str,
        grants: &[Grant],
        now: SystemTime,
        epoch: u64,
        wanted_expiry: SystemTime,
    ) -> Result<SystemTime, Denial> {
        if self.delegated_by.is_some() {
            return Err(Denial::Delegated);
        }
        let replay = |at: SystemTime| -> Result<(), Denial> {
            for g in grants {
                self.authorize(&Request {
                    peer: delegator,
                    now: at,
                    epoch,
                    tool: &g.tool,
                    op: &g.op,
                    args: &g.constraints,
                })?;
            }
            Ok(())
        };
        replay(now)?;
        let mut latest = wanted_expiry.min(self.expires_at);
        let last_moment = |t: SystemTime| t.checked_sub(Duration::from_secs(1)).unwrap_or(t);
        if replay(last_moment(latest)).is_err() {
            // A time bound the holder appended ends earlier: find it
            // (checks on time are monotone), to the second.
            let (mut lo, mut hi) = (now, latest);
            while hi.duration_since(lo).unwrap_or_default() > Duration::from_secs(1) {
                let mid = lo + hi.duration_since(lo).unwrap_or_default() / 2;
                if replay(mid).is_ok() {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            latest = lo;
        }
        Ok(latest)
    }
}

fn denial_of(checks: &[FailedCheck]) -> Denial {
    for c in checks {
        if let FailedCheck::Authorizer(a) = c
            && let Some(d) = CHECK_REASONS.get(a.check_id as usize)
        {
            return d.clone();
        }
    }
    if checks.iter().any(|c| matches!(c, FailedCheck::Block(_))) {
        Denial::AttenuationCheck
    } else {
        Denial::Malformed
    }
}

/// Appends a block of holder checks to a token, offline (no key needed).
/// `checks` is Datalog source (checks only); values should be passed as
/// `{name}` parameters.
pub fn attenuate(
    token: &str,
    checks: &str,
    values: HashMap<String, Term>,
) -> Result<String, TokenError> {
    let u = UnverifiedBiscuit::from_base64(token).map_err(build_err)?;
    let block = biscuit_auth::builder::BlockBuilder::new()
        .code_with_params(checks, values, HashMap::new())
        .map_err(build_err)?;
    u.append(block)
        .map_err(build_err)?
        .to_base64()
        .map_err(build_err)
}

/// Seconds since the epoch, for responses and records.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The root public key type tokens are verified with.
pub use biscuit_auth::PublicKey;
/// A Datalog check, as carried from a parent token into a delegated one.
pub use biscuit_auth::builder::Check as HolderCheck;
/// Re-exported so holders and tests can pass parameters to [`attenuate`].
pub use biscuit_auth::builder::Term as DatalogTerm;

#[cfg(test)]
mod tests;
