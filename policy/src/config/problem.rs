//! Problems found in a config, reported as `FILE:LINE:COL: key.path: message`.

use std::fmt;

use std::collections::HashSet;

use super::yaml::{Pos, PosIndex, child_index};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem: where, which key, what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub line: u32,
    pub col: u32,
    /// `broker.tools[0].allowed_values.table`; `(file)` for the file itself,
    /// `(document)` for the document as a whole.
    pub path: String,
    pub message: String,
}

/// Everything found in one run over one file.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The file as named on the command line.
    pub file: String,
    /// Errors and warnings, in file order.
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Warning)
    }

    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }

    /// One line per problem: `FILE:LINE:COL: key.path: message`
    /// (warnings say `warning:` before the message).
    pub fn line(&self, p: &Problem) -> String {
        let w = match p.severity {
            Severity::Error => "",
            Severity::Warning => "warning: ",
        };
        format!(
            "{}:{}:{}: {}: {w}{}",
            self.file, p.line, p.col, p.path, p.message
        )
    }

    pub(crate) fn sort(&mut self) {
        self.problems.sort_by(|a, b| {
            (a.line, a.col, &a.path, &a.message).cmp(&(b.line, b.col, &b.path, &b.message))
        });
        self.problems.dedup();
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            writeln!(f, "{}", self.line(p))?;
        }
        Ok(())
    }
}

/// Collects problems while the config is built.
#[derive(Debug)]
pub(crate) struct Sink<'a> {
    index: &'a PosIndex,
    pub(crate) problems: Vec<Problem>,
    /// Paths that already failed to deserialize: not "missing" as well.
    broken: Vec<String>,
    /// Sequence items pruned during deserialization (so the raw lists are
    /// shorter than the file's): used to map list indices back.
    pruned: HashSet<String>,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(index: &'a PosIndex) -> Self {
        Sink {
            index,
            problems: Vec::new(),
            broken: Vec::new(),
            pruned: HashSet::new(),
        }
    }

    /// The path of the `i`-th item that survived deserialization of the
    /// list at `seq`: its index in the file, not in the raw list.
    pub(crate) fn item(&self, seq: &str, i: usize) -> String {
        let mut seen = 0;
        let mut j = 0;
        loop {
            let p = child_index(seq, j);
            if !self.pruned.contains(&p) {
                if seen == i {
                    return p;
                }
                seen += 1;
            }
            j += 1;
        }
    }

    pub(crate) fn push_at(&mut self, severity: Severity, pos: Pos, path: &str, message: String) {
        self.problems.push(Problem {
            severity,
            line: pos.line,
            col: pos.col,
            path: if path.is_empty() {
                "(document)".to_owned()
            } else {
                path.to_owned()
            },
            message,
        });
    }

    pub(crate) fn broken(&mut self, path: &str) {
        self.broken.push(path.to_owned());
        self.pruned.insert(path.to_owned());
    }

    pub(crate) fn error(&mut self, path: &str, message: impl Into<String>) {
        let pos = self.index.lookup(path);
        self.push_at(Severity::Error, pos, path, message.into());
    }

    pub(crate) fn warning(&mut self, path: &str, message: impl Into<String>) {
        let pos = self.index.lookup(path);
        self.push_at(Severity::Warning, pos, path, message.into());
    }

    /// Whether `path` (or something below it) failed to deserialize.
    pub(crate) fn is_broken(&self, path: &str) -> bool {
        self.broken.iter().any(|b| {
            b == path
                || b.strip_prefix(path)
                    .is_some_and(|r| r.starts_with(['.', '[']))
        })
    }

    /// A required key that is absent (unless it is present but already
    /// reported as malformed).
    pub(crate) fn missing(&mut self, path: &str, what: &str) {
        let broken = self.broken.iter().any(|b| {
            b == path
                || b.strip_prefix(path)
                    .is_some_and(|r| r.starts_with(['.', '[']))
        });
        if !broken {
            self.error(path, format!("missing required key: {what}"));
        }
    }

    pub(crate) fn error_count(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count()
    }
}
