//! The broker's durable state in `state_dir` (0700; files 0600):
//!
//! ```text
//! ca.key      the CA's private key (PEM)         ca.crt   the CA certificate
//! root.key    the Biscuit root key (PEM)         state.json  epoch, revocations,
//! audit.jsonl the audit trail (see audit/)                   delegation links, tickets
//! audit.jsonl.tip  the trail's durable tip: last seq and hash (audit/)
//! ```
//!
//! Lever's provisioning may have written its own files there before the
//! broker's first start ([`BROKER_LOG`], [`QEMU_CONSOLE`], the machine
//! definitions in [`LIMA_DIR`]); a fresh dir holding those and nothing else
//! is initialized, a dir holding anything else is refused.
//!
//! Every change to `state.json` is written to a temporary file, fsynced,
//! renamed over the old one and the directory fsynced, before the caller is
//! answered: a `200` means the change survives `kill -9`. A missing or
//! corrupt file is a startup error, never a reset: resetting would roll the
//! epoch back and forget revocations.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use lever_policy::token::{TokenId, unix_secs};
use serde::{Deserialize, Serialize};

use crate::error::StartError;

pub(crate) const CA_KEY: &str = "ca.key";
pub(crate) const CA_CERT: &str = "ca.crt";
pub(crate) const ROOT_KEY: &str = "root.key";
pub(crate) const STATE: &str = "state.json";
pub(crate) const AUDIT: &str = "audit.jsonl";
/// The audit trail's recorded tip (`audit::tip_path`), and its temporary
/// file while it is replaced.
const AUDIT_TIP: &str = "audit.jsonl.tip";
const AUDIT_TIP_TMP: &str = "audit.jsonl.tip.tmp";
pub(crate) const LOCK: &str = "lock";

/// What `lever apply`/`up` write in the state dir: the log of the broker
/// they start (a regular file, 0600).
pub const BROKER_LOG: &str = "broker.log";
/// What `lever qemu` writes there by default: the guest's serial console
/// (a regular file, 0600).
pub const QEMU_CONSOLE: &str = "qemu-console.log";
/// Where `lever apply`/`up` write a lima machine's definition: a directory
/// (0700) of `<machine>.yaml` regular files (0600).
pub const LIMA_DIR: &str = "lima";

/// Consumed tickets are kept this long after expiry (for the audit's sake
/// and to answer "already used" rather than "unknown").
const TICKET_KEEP: Duration = Duration::from_secs(7 * 86_400);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Ticket {
    pub(crate) identity: String,
    pub(crate) expires_at: u64,
    pub(crate) consumed_at: Option<u64>,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Persisted {
    pub(crate) version: u32,
    pub(crate) epoch: u64,
    /// Identity -> when it was revoked (unix seconds).
    pub(crate) revoked_identities: BTreeMap<String, u64>,
    /// Token id -> when it was revoked.
    pub(crate) revoked_tokens: BTreeMap<String, u64>,
    /// Parent token id -> delegated children.
    pub(crate) children: BTreeMap<String, BTreeSet<String>>,
    /// SHA-256 (hex) of a ticket -> the ticket. The ticket itself is never stored.
    pub(crate) tickets: BTreeMap<String, Ticket>,
    /// Last certificate serial issued.
    pub(crate) serial: u64,
}

impl Persisted {
    fn new() -> Persisted {
        Persisted {
            version: 1,
            epoch: 1,
            revoked_identities: BTreeMap::new(),
            revoked_tokens: BTreeMap::new(),
            children: BTreeMap::new(),
            tickets: BTreeMap::new(),
            serial: 0,
        }
    }
}

/// Why a ticket could not be redeemed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TicketRefusal {
    Unknown,
    Used,
    Expired,
    IdentityRevoked,
    /// The ticket's identity is no longer an agent of the config (it was
    /// issued before the config changed).
    UnknownAgent,
}

/// The state directory and the in-memory copy of `state.json`. All
/// mutations go through [`State::update`], which persists before returning.
#[derive(Debug)]
pub(crate) struct State {
    dir: PathBuf,
    /// What requests read: held only for a read or to swap in a new state,
    /// never across a write to disk.
    inner: Mutex<Persisted>,
    /// Serializes changes: held across the write and its fsyncs, which
    /// readers never wait for.
    writer: Mutex<()>,
    /// Held (flock, exclusive) for the broker's lifetime: two brokers never
    /// share a state dir.
    _lock: File,
}

/// Takes the state dir's lock, or says who holds it.
fn lock(dir: &Path) -> Result<File, StartError> {
    let path = dir.join(LOCK);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        StartError::State(format!(
            "{} is in use by another broker (its lock is held)",
            dir.display()
        ))
    })?;
    Ok(f)
}

fn io_err(path: &Path, e: std::io::Error) -> StartError {
    StartError::State(format!("{}: {e}", path.display()))
}

/// The first entry of a state dir without broker state that Lever did not
/// put there. Lever's are: the broker's empty audit file and lock, and what
/// provisioning writes before the broker's first start ([`BROKER_LOG`] and
/// [`QEMU_CONSOLE`], regular files; [`LIMA_DIR`], a real directory holding
/// only regular `*.yaml` files). Symlinks are never Lever's.
fn foreign_entry(dir: &Path) -> Result<Option<String>, StartError> {
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        // Not followed: a symlink is a symlink here.
        let kind = entry.file_type().map_err(|e| io_err(&path, e))?;
        let name = entry.file_name();
        let ours = match name.to_str() {
            Some(AUDIT | AUDIT_TIP | AUDIT_TIP_TMP | LOCK | BROKER_LOG | QEMU_CONSOLE) => {
                kind.is_file()
            }
            Some(LIMA_DIR) if kind.is_dir() => {
                for e in fs::read_dir(&path).map_err(|e| io_err(&path, e))? {
                    let e = e.map_err(|x| io_err(&path, x))?;
                    let is_file = e.file_type().map_err(|x| io_err(&e.path(), x))?.is_file();
                    let inner = e.file_name();
                    let yaml = inner.to_str().is_some_and(|n| {
                        n.strip_suffix(".yaml").is_some_and(|stem| !stem.is_empty())
                    });
                    if !(is_file && yaml) {
                        return Ok(Some(format!("{LIMA_DIR}/{}", inner.to_string_lossy())));
                    }
                }
                true
            }
            _ => false,
        };
        if !ours {
            return Ok(Some(name.to_string_lossy().into_owned()));
        }
    }
    Ok(None)
}

/// Writes `bytes` to `path` atomically and durably, mode 0600.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Creates `path` with `bytes`, mode 0600, failing if it exists.
fn create_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// What a fresh state dir is initialized with.
pub(crate) struct Fresh {
    pub(crate) ca_key_pem: String,
    pub(crate) ca_cert_pem: String,
    pub(crate) root_key_pem: String,
}

/// The secrets read back from a state dir.
pub(crate) struct Loaded {
    pub(crate) state: State,
    pub(crate) ca_key_pem: String,
    pub(crate) ca_cert_pem: String,
    pub(crate) root_key_pem: String,
    pub(crate) created: bool,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the keys.
        f.debug_struct("Loaded")
            .field("dir", &self.state.dir)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl State {
    /// Opens the state dir, creating it (with `fresh()`) only if it does
    /// not exist or is empty. Anything in between is an error.
    pub(crate) fn open(
        dir: &Path,
        fresh: impl FnOnce() -> Result<Fresh, StartError>,
    ) -> Result<Loaded, StartError> {
        let uid = rustix::process::geteuid().as_raw();
        let exists = match fs::symlink_metadata(dir) {
            Ok(md) => {
                use std::os::unix::fs::MetadataExt;
                if !md.is_dir() || md.file_type().is_symlink() {
                    return Err(StartError::State(format!(
                        "{} is not a directory",
                        dir.display()
                    )));
                }
                let mode = md.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(StartError::State(format!(
                        "{} has mode {mode:04o}; the state dir must be 0700 (chmod 700 {})",
                        dir.display(),
                        dir.display()
                    )));
                }
                if md.uid() != uid {
                    return Err(StartError::State(format!(
                        "{} is owned by uid {}, not by the broker's uid {uid}",
                        dir.display(),
                        md.uid()
                    )));
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(dir, e)),
        };
        let names = [CA_KEY, CA_CERT, ROOT_KEY, STATE];
        let present: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| dir.join(n).exists())
            .collect();
        if !exists || present.is_empty() {
            if exists && fs::metadata(dir.join(AUDIT)).is_ok_and(|m| m.len() > 0) {
                return Err(StartError::State(format!(
                    "{} holds an audit trail but no state: the state was lost. Refusing to start over it (revocations and the epoch would be forgotten). Restore the state from a backup, or move the directory away to start over.",
                    dir.display()
                )));
            }
            if exists && let Some(other) = foreign_entry(dir)? {
                return Err(StartError::State(format!(
                    "{} is not empty but holds no broker state ({other:?} is not Lever's): refusing to initialize over it",
                    dir.display()
                )));
            }
            return Self::create(dir, fresh()?);
        }
        if present.len() != names.len() {
            let missing: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| !present.contains(n))
                .collect();
            return Err(StartError::State(format!(
                "{} is incomplete: {} missing. Refusing to start: re-creating it would roll the epoch back and forget revocations. Restore it from a backup, or remove the directory to start over (every agent must then enrol again).",
                dir.display(),
                missing.join(", ")
            )));
        }
        // The lock before any read: a broker still running may confirm a
        // change (a `200`) after this one read the state and before it
        // could take the lock, and this one would then serve, and later
        // overwrite, the older state.
        let held = lock(dir)?;
        let read = |name: &str| -> Result<String, StartError> {
            let p = dir.join(name);
            let md = fs::symlink_metadata(&p).map_err(|e| io_err(&p, e))?;
            if !md.is_file() {
                return Err(StartError::State(format!(
                    "{} is not a regular file",
                    p.display()
                )));
            }
            if md.permissions().mode() & 0o077 != 0 {
                return Err(StartError::State(format!(
                    "{} has mode {:04o}; broker state files must be 0600",
                    p.display(),
                    md.permissions().mode() & 0o777
                )));
            }
            fs::read_to_string(&p).map_err(|e| io_err(&p, e))
        };
        let state_text = read(STATE)?;
        let persisted: Persisted = serde_json::from_str(&state_text).map_err(|e| {
            StartError::State(format!(
                "{} is corrupt ({e}). Refusing to start: a reset would roll the epoch back. Restore it from a backup.",
                dir.join(STATE).display()
            ))
        })?;
        if persisted.version != 1 {
            return Err(StartError::State(format!(
                "{}: unsupported state version {}",
                dir.join(STATE).display(),
                persisted.version
            )));
        }
        Ok(Loaded {
            ca_key_pem: read(CA_KEY)?,
            ca_cert_pem: read(CA_CERT)?,
            root_key_pem: read(ROOT_KEY)?,
            state: State {
                dir: dir.to_path_buf(),
                inner: Mutex::new(persisted),
                writer: Mutex::new(()),
                _lock: held,
            },
            created: false,
        })
    }

    fn create(dir: &Path, fresh: Fresh) -> Result<Loaded, StartError> {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| io_err(dir, e))?;
        let persisted = Persisted::new();
        let json =
            serde_json::to_vec_pretty(&persisted).map_err(|e| StartError::State(e.to_string()))?;
        // Secrets first, state.json last: a crash in between leaves an
        // incomplete dir, which the next start reports instead of reusing.
        for (name, bytes) in [
            (CA_KEY, fresh.ca_key_pem.as_bytes()),
            (CA_CERT, fresh.ca_cert_pem.as_bytes()),
            (ROOT_KEY, fresh.root_key_pem.as_bytes()),
            (STATE, json.as_slice()),
        ] {
            let p = dir.join(name);
            create_new(&p, bytes).map_err(|e| io_err(&p, e))?;
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, e))?;
        Ok(Loaded {
            state: State {
                dir: dir.to_path_buf(),
                inner: Mutex::new(persisted),
                writer: Mutex::new(()),
                _lock: lock(dir)?,
            },
            ca_key_pem: fresh.ca_key_pem,
            ca_cert_pem: fresh.ca_cert_pem,
            root_key_pem: fresh.root_key_pem,
            created: true,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Persisted> {
        // A poisoned lock means a panic mid-update; the persisted file is
        // still the last complete state, and the in-memory copy is only
        // changed after a successful write (see `update`).
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the state.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&Persisted) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the state durably: `f` edits a copy; if it returns `Ok`, the
    /// copy is written and fsynced, and only then becomes the state.
    /// Changes are serialized; requests reading the state meanwhile see the
    /// state before the change (it is not answered yet) and never wait for
    /// the disk. Blocking (fsync): call from a blocking context.
    pub(crate) fn update<R, E: From<std::io::Error>>(
        &self,
        f: impl FnOnce(&mut Persisted) -> Result<R, E>,
    ) -> Result<R, E> {
        let _writing = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Only a writer changes the state, and this is the only one now.
        let current = self.lock().clone();
        let mut next = current.clone();
        let r = f(&mut next)?;
        if next != current {
            prune(&mut next);
            let json = serde_json::to_vec_pretty(&next).map_err(std::io::Error::other)?;
            write_atomic(&self.dir.join(STATE), &json)?;
            *self.lock() = next;
        }
        Ok(r)
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.read(|s| s.epoch)
    }

    pub(crate) fn is_identity_revoked(&self, identity: &str) -> bool {
        self.read(|s| s.revoked_identities.contains_key(identity))
    }

    pub(crate) fn is_token_revoked(&self, id: &TokenId) -> bool {
        self.read(|s| s.revoked_tokens.contains_key(id.as_str()))
    }
}

/// Drops tickets that can no longer matter.
fn prune(s: &mut Persisted) {
    let now = unix_secs(SystemTime::now());
    s.tickets
        .retain(|_, t| t.expires_at + TICKET_KEEP.as_secs() > now);
}

/// Revokes `id` and everything delegated from it, transitively.
pub(crate) fn revoke_token_tree(s: &mut Persisted, id: &str, now: u64) -> Vec<String> {
    let mut revoked = Vec::new();
    let mut stack = vec![id.to_owned()];
    // Bounded by the number of links: each id is visited once.
    while let Some(x) = stack.pop() {
        if s.revoked_tokens.contains_key(&x) && x != id {
            continue;
        }
        s.revoked_tokens.entry(x.clone()).or_insert(now);
        if let Some(children) = s.children.get(&x) {
            stack.extend(
                children
                    .iter()
                    .filter(|c| !s.revoked_tokens.contains_key(*c))
                    .cloned(),
            );
        }
        revoked.push(x);
    }
    revoked
}

#[cfg(test)]
mod tests;
