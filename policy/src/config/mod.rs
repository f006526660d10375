//! `lever.yaml`: loading, validation, the validated model and its schema.
//!
//! Parse, don't validate: the file is read with a size cap, parsed by
//! serde-saphyr into a positioned tree (duplicate keys and alias bombs
//! rejected), deserialized into the raw types of [`raw`] (unknown keys
//! rejected), and converted into the validated [`Config`], collecting every
//! problem with its line, column and key path on the way.

mod build;
pub mod fs;
pub mod model;
mod problem;
pub mod raw;
mod schema;
pub mod values;
mod yaml;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use fs::Env;
pub use model::*;
pub use problem::{Problem, Report, Severity};
pub use schema::json_schema;
pub use yaml::Pos;

use problem::Sink;

/// The canonical config file name, looked up in the current directory only
/// (never in a parent: a `lever.yaml` planted above the instance is never
/// picked up).
pub const CONFIG_FILE: &str = "lever.yaml";

/// Largest config file accepted.
pub const CONFIG_MAX_BYTES: u64 = 256 * 1024;

/// A valid config and the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub report: Report,
}

/// Loads and validates the config at `path` (as named by the operator:
/// `lever.yaml` in the current directory, or an explicit `-c FILE`).
pub fn load(path: &Path, env: &Env) -> Result<Loaded, Report> {
    let label = path.display().to_string();
    let file_problem = |message: String| {
        let mut r = Report {
            file: label.clone(),
            problems: Vec::new(),
        };
        r.problems.push(Problem {
            severity: Severity::Error,
            line: 1,
            col: 1,
            path: "(file)".to_owned(),
            message,
        });
        r
    };
    let text = read_config(path, env).map_err(file_problem)?;
    let file_real = path
        .canonicalize()
        .map_err(|e| file_problem(format!("cannot resolve: {e}")))?;
    let root = file_real
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| file_problem("has no parent directory".to_owned()))?;
    let inputs = build::Inputs {
        env,
        file: path,
        file_real: &file_real,
        root: &root,
    };
    check_str(&text, &label, &inputs)
}

/// Reads the config: a regular file, at most [`CONFIG_MAX_BYTES`], UTF-8,
/// not writable by others.
fn read_config(path: &Path, env: &Env) -> Result<String, String> {
    let md = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            if path == Path::new(CONFIG_FILE) {
                format!(
                    "no {CONFIG_FILE} in the current directory (Lever never looks in parent directories); run lever from the instance root or pass -c FILE"
                )
            } else {
                "does not exist".to_owned()
            }
        } else {
            format!("cannot be read: {e}")
        }
    })?;
    if !md.is_file() {
        return Err("is not a regular file".to_owned());
    }
    if md.len() > CONFIG_MAX_BYTES {
        return Err(format!(
            "is {} bytes; a lever.yaml may be at most {CONFIG_MAX_BYTES}",
            md.len()
        ));
    }
    fs::not_writable_by_others(path, &md, env)?;
    let mut bytes = Vec::with_capacity(usize::try_from(md.len()).unwrap_or(0));
    std::fs::File::open(path)
        .and_then(|f| f.take(CONFIG_MAX_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot be read: {e}"))?;
    if bytes.len() as u64 > CONFIG_MAX_BYTES {
        return Err(format!("is larger than {CONFIG_MAX_BYTES} bytes"));
    }
    String::from_utf8(bytes).map_err(|e| format!("is not UTF-8 ({e})"))
}

fn check_str(text: &str, label: &str, inputs: &build::Inputs<'_>) -> Result<Loaded, Report> {
    let mut report = Report {
        file: label.to_owned(),
        problems: Vec::new(),
    };
    let (raw, index, mut sink_problems) = match parse_raw(text) {
        Ok(v) => v,
        Err(problems) => {
            report.problems = problems;
            report.sort();
            return Err(report);
        }
    };
    let mut sink = Sink::new(&index);
    for p in sink_problems.drain(..) {
        sink.broken(&p.path);
        sink.problems.push(p);
    }
    let config = build::build(raw, &mut sink, inputs);
    report.problems = sink.problems;
    report.sort();
    match config {
        Some(config) if !report.has_errors() => Ok(Loaded { config, report }),
        _ => Err(report),
    }
}

/// Text -> raw config, with every structural problem (syntax, duplicate
/// keys, wrong types, unknown keys) found on the way.
fn parse_raw(text: &str) -> Result<(raw::RawConfig, yaml::PosIndex, Vec<Problem>), Vec<Problem>> {
    let tree = yaml::parse_tree(text).map_err(|f| {
        vec![Problem {
            severity: Severity::Error,
            line: f.pos.line,
            col: f.pos.col,
            path: if f.path.is_empty() {
                "(document)".to_owned()
            } else {
                f.path
            },
            message: f.message,
        }]
    })?;
    let index = yaml::PosIndex::build(&tree);
    let doc_problem = |message: &str| {
        vec![Problem {
            severity: Severity::Error,
            line: 1,
            col: 1,
            path: "(document)".to_owned(),
            message: message.to_owned(),
        }]
    };
    match &tree.value {
        yaml::Value::Map(_) => {}
        yaml::Value::Null => return Err(doc_problem("the config is empty")),
        _ => {
            return Err(doc_problem(
                "the config must be a mapping of keys (name:, backend:, tree:, ...)",
            ));
        }
    }
    let (raw, errors) = yaml::deserialize_all::<raw::RawConfig>(&tree);
    let problems: Vec<Problem> = errors
        .into_iter()
        .map(|e| {
            let path = e.path.unwrap_or_default();
            let pos = if e.message.starts_with("unknown key") {
                index.key_pos(&path)
            } else {
                index.lookup(&path)
            };
            Problem {
                severity: Severity::Error,
                line: pos.line,
                col: pos.col,
                path: if path.is_empty() {
                    "(document)".to_owned()
                } else {
                    path
                },
                message: e.message,
            }
        })
        .collect();
    match raw {
        Some(raw) => Ok((raw, index, problems)),
        None => Err(problems),
    }
}

/// Entry points for fuzzing and benches; not a stable API.
#[doc(hidden)]
pub mod internal {
    use super::*;

    /// Runs the whole pipeline on arbitrary bytes with a root that does
    /// not exist (so the file-system rules run without touching anything).
    pub fn check_bytes(data: &[u8]) -> Result<(), Report> {
        let text = match std::str::from_utf8(data) {
            Ok(t) => t,
            Err(_) => return Ok(()),
        };
        let root = PathBuf::from("/nonexistent/lever-fuzz-root");
        let file = root.join(CONFIG_FILE);
        let env = Env {
            home: Some(root.join("home")),
            uid: u32::MAX,
        };
        let inputs = build::Inputs {
            env: &env,
            file: &file,
            file_real: &file,
            root: &root,
        };
        check_str(text, "fuzz.yaml", &inputs).map(|_| ())
    }

    /// The structural half only: YAML -> raw config with all problems.
    pub fn parse_raw_count(text: &str) -> usize {
        match parse_raw(text) {
            Ok((_, _, p)) | Err(p) => p.len(),
        }
    }
}
