//! The YAML layer: text -> a positioned node tree -> serde.
//!
//! serde-saphyr does the parsing (duplicate keys rejected, aliases budgeted,
//! one document only) into a generic tree in which every node keeps its line
//! and column. The raw config structs are then deserialized from that tree by
//! [`TreeDeserializer`], which knows the key path of every value, so a type
//! error names `broker.tools[0].backend`, not just a line. A node that fails
//! is pruned and deserialization runs again, so one run reports every
//! structural problem instead of stopping at the first.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde_saphyr::Spanned;
use serde_saphyr::granit_parser::{Event, Parser};

/// A 1-based line and column in the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl Pos {
    pub(crate) const START: Pos = Pos { line: 1, col: 1 };

    fn from_location(l: serde_saphyr::Location) -> Pos {
        if l.line() == 0 {
            return Pos::START;
        }
        Pos {
            line: u32::try_from(l.line()).unwrap_or(u32::MAX),
            col: u32::try_from(l.column()).unwrap_or(u32::MAX),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) value: Value,
    pub(crate) pos: Pos,
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) key_pos: Pos,
    pub(crate) node: Node,
}

#[derive(Debug)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// Limits applied while parsing, before any node reaches the config model.
/// A lever.yaml is a few hundred nodes; these leave two orders of magnitude.
const MAX_NODES: usize = 20_000;
const MAX_DEPTH: usize = 32;
const MAX_ALIASES: usize = 256;

/// A failure to turn the text into a tree at all (syntax, duplicate key,
/// alias budget, several documents).
#[derive(Debug)]
pub(crate) struct ParseFailure {
    pub(crate) pos: Pos,
    pub(crate) path: String,
    pub(crate) message: String,
}

pub(crate) fn parse_tree(src: &str) -> Result<Node, ParseFailure> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = MAX_NODES;
    budget.max_depth = MAX_DEPTH;
    budget.max_aliases = MAX_ALIASES;
    budget.max_anchors = MAX_ALIASES;
    budget.max_documents = 1;
    budget.max_total_scalar_bytes = 4 * 1024 * 1024;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    // YAML 1.2 booleans only: `y`, `yes`, `on`, `no` stay strings (a table
    // called `n` or a grove called `on` must not turn into `false`).
    options.strict_booleans = true;
    options.reject_unsupported_tags = true;
    match serde_saphyr::from_str_with_options::<Spanned<ValueSeed>>(src, options) {
        Ok(root) => Ok(Node {
            value: root.value.0,
            pos: Pos::from_location(root.referenced),
        }),
        Err(e) => {
            let pos = e.location().map(Pos::from_location).unwrap_or(Pos::START);
            let inner = e.without_snippet();
            let message = serde_saphyr::MessageFormatter::format_message(
                &serde_saphyr::DefaultMessageFormatter,
                inner,
            )
            .into_owned();
            Err(ParseFailure {
                path: path_at(src, pos),
                pos,
                message: tidy_parse_message(&message),
            })
        }
    }
}

fn tidy_parse_message(m: &str) -> String {
    let m = m.trim();
    if let Some(rest) = m.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(", set ").next().unwrap_or(rest);
        return format!("duplicate key `{key}` (a key may appear only once per mapping)");
    }
    if m.starts_with("multiple YAML documents") || m.contains("Documents {") {
        return "lever.yaml must hold exactly one YAML document".to_owned();
    }
    if m.starts_with("budget breached") {
        return format!(
            "YAML too large or too deeply aliased ({m}); lever.yaml allows {MAX_ALIASES} aliases, {MAX_NODES} nodes, depth {MAX_DEPTH}"
        );
    }
    m.lines().next().unwrap_or(m).to_owned()
}

/// The key path at a position of a document that may not parse as a whole:
/// replays parser events up to `at`, tracking mapping keys and sequence
/// indices. Used to name the key of a syntax or duplicate-key error.
pub(crate) fn path_at(src: &str, at: Pos) -> String {
    enum Frame {
        Map { key: Option<String>, want_key: bool },
        Seq { cur: Option<usize>, next: usize },
    }
    fn enter_node(stack: &mut [Frame], scalar: Option<&str>) {
        match stack.last_mut() {
            Some(Frame::Map { key, want_key }) if *want_key => {
                *key = Some(scalar.unwrap_or("?").to_owned());
                *want_key = false;
            }
            Some(Frame::Seq { cur, next }) => {
                *cur = Some(*next);
                *next += 1;
            }
            Some(Frame::Map { .. }) | None => {}
        }
    }
    fn leave_value(stack: &mut [Frame]) {
        if let Some(Frame::Map { want_key, .. }) = stack.last_mut() {
            *want_key = true;
        }
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut path = String::new();
    for ev in Parser::new_from_str(src) {
        let Ok((ev, span)) = ev else { break };
        let here = (span.start.line(), span.start.col() + 1);
        if here > (at.line as usize, at.col as usize) {
            break;
        }
        match ev {
            Event::Scalar(s, ..) => {
                let was_key = matches!(stack.last(), Some(Frame::Map { want_key: true, .. }));
                enter_node(&mut stack, Some(&s));
                if !was_key {
                    leave_value(&mut stack);
                }
            }
            Event::Alias(_) => {
                enter_node(&mut stack, None);
                leave_value(&mut stack);
            }
            Event::MappingStart(..) => {
                enter_node(&mut stack, None);
                stack.push(Frame::Map {
                    key: None,
                    want_key: true,
                });
            }
            Event::SequenceStart(..) => {
                enter_node(&mut stack, None);
                stack.push(Frame::Seq { cur: None, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                leave_value(&mut stack);
            }
            _ => continue,
        }
        path.clear();
        for f in &stack {
            match f {
                Frame::Map { key: Some(k), .. } => push_key(&mut path, k),
                Frame::Seq { cur: Some(i), .. } => path.push_str(&format!("[{i}]")),
                _ => {}
            }
        }
    }
    path
}

pub(crate) fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

pub(crate) fn child_key(path: &str, key: &str) -> String {
    let mut p = path.to_owned();
    push_key(&mut p, key);
    p
}

pub(crate) fn child_index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Builds a [`Value`] from serde-saphyr, keeping every child's position.
struct ValueSeed(Value);

impl<'de> serde::Deserialize<'de> for ValueSeed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor).map(ValueSeed)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Value, E> {
        Err(E::custom("binary values are not allowed in lever.yaml"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<ValueSeed>>()? {
            items.push(Node {
                value: item.value.0,
                pos: Pos::from_location(item.referenced),
            });
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let value: Spanned<ValueSeed> = map.next_value()?;
            entries.push(Entry {
                key: key.value,
                key_pos: Pos::from_location(key.referenced),
                node: Node {
                    value: value.value.0,
                    pos: Pos::from_location(value.referenced),
                },
            });
        }
        Ok(Value::Map(entries))
    }
}

/// Where each key path sits in the file: the position to report for it
/// (scalars point at the value, collections at their key or `-` item) and
/// the position of its key.
#[derive(Debug, Default)]
pub(crate) struct PosIndex(HashMap<String, (Pos, Pos)>);

impl PosIndex {
    pub(crate) fn build(root: &Node) -> PosIndex {
        fn walk(node: &Node, path: &str, key: Pos, out: &mut HashMap<String, (Pos, Pos)>) {
            match &node.value {
                Value::Seq(items) => {
                    out.insert(path.to_owned(), (key, key));
                    for (i, item) in items.iter().enumerate() {
                        walk(item, &child_index(path, i), item.pos, out);
                    }
                }
                Value::Map(entries) => {
                    out.insert(path.to_owned(), (key, key));
                    for e in entries {
                        walk(&e.node, &child_key(path, &e.key), e.key_pos, out);
                    }
                }
                _ => {
                    out.insert(path.to_owned(), (node.pos, key));
                }
            }
        }
        let mut out = HashMap::new();
        walk(root, "", Pos::START, &mut out);
        PosIndex(out)
    }

    fn find(&self, path: &str) -> (Pos, Pos) {
        let mut p = path;
        loop {
            if let Some(pos) = self.0.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return (Pos::START, Pos::START),
            }
        }
    }

    /// The position to report for `path`, or for its nearest ancestor that
    /// exists (a missing key is reported where its parent mapping is).
    pub(crate) fn lookup(&self, path: &str) -> Pos {
        self.find(path).0
    }

    /// The position of the key itself (for "unknown key" problems).
    pub(crate) fn key_pos(&self, path: &str) -> Pos {
        self.find(path).1
    }
}

/// A deserialization error, located at the key path where it happened.
#[derive(Debug)]
pub(crate) struct DeError {
    pub(crate) path: Option<String>,
    pub(crate) message: String,
}

impl DeError {
    fn at(mut self, path: &str) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_owned());
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            path: None,
            message: msg.to_string(),
        }
    }

    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        let found = match unexp {
            de::Unexpected::Str(s) => format!("the string {s:?}"),
            de::Unexpected::Map => "a mapping".to_owned(),
            de::Unexpected::Seq => "a list".to_owned(),
            de::Unexpected::Unit => "an empty value".to_owned(),
            other => other.to_string(),
        };
        let hint = match unexp {
            de::Unexpected::Signed(_)
            | de::Unexpected::Unsigned(_)
            | de::Unexpected::Float(_)
            | de::Unexpected::Bool(_)
                if exp.to_string().contains("string") =>
            {
                " (quote it to make it a string)"
            }
            _ => "",
        };
        DeError::custom(format!(
            "expected {}, found {found}{hint}",
            expected_name(exp)
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError::custom(format!(
            "unknown key `{field}` (allowed here: {})",
            expected.join(", ")
        ))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::custom(format!(
            "unknown value `{variant}` (expected one of: {})",
            expected.join(", ")
        ))
    }
}

/// serde's names for what it expected, in the words of a YAML author.
fn expected_name(exp: &dyn de::Expected) -> String {
    let e = exp.to_string();
    match e.as_str() {
        "i8" | "i16" | "i32" | "i64" | "i128" | "u8" | "u16" | "u32" | "u64" | "u128" => {
            "an integer".to_owned()
        }
        "a sequence" => "a list".to_owned(),
        "a map" => "a mapping".to_owned(),
        _ if e.starts_with("struct ") => "a mapping".to_owned(),
        _ if e.starts_with("enum ") => "one of the allowed words".to_owned(),
        _ => e,
    }
}

/// A serde deserializer over a [`Node`], skipping pruned paths.
pub(crate) struct TreeDeserializer<'a> {
    pub(crate) node: &'a Node,
    pub(crate) path: String,
    pub(crate) pruned: &'a HashSet<String>,
}

impl<'a> TreeDeserializer<'a> {
    fn child(&self, node: &'a Node, path: String) -> TreeDeserializer<'a> {
        TreeDeserializer {
            node,
            path,
            pruned: self.pruned,
        }
    }
}

impl<'de, 'a> de::Deserializer<'de> for TreeDeserializer<'a> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => match (u64::try_from(*i), i64::try_from(*i)) {
                (Ok(u), _) => visitor.visit_u64(u),
                (_, Ok(s)) => visitor.visit_i64(s),
                _ => visitor.visit_i128(*i),
            },
            Value::Float(f) => visitor.visit_f64(*f),
            Value::Str(s) => visitor.visit_str(s),
            Value::Seq(items) => visitor.visit_seq(SeqAccess {
                de: &self,
                items: items.iter().enumerate(),
            }),
            Value::Map(entries) => visitor.visit_map(MapAccess {
                de: &self,
                entries: entries.iter(),
                value: None,
            }),
        };
        r.map_err(|e| e.at(&self.path))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Str(s) => visitor
                .visit_enum(s.as_str().into_deserializer())
                .map_err(|e: DeError| e.at(&self.path)),
            _ => self.deserialize_any(visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

struct SeqAccess<'s, 'a, I> {
    de: &'s TreeDeserializer<'a>,
    items: I,
}

impl<'de, 'a, I: Iterator<Item = (usize, &'a Node)>> de::SeqAccess<'de> for SeqAccess<'_, 'a, I> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        for (i, node) in self.items.by_ref() {
            let path = child_index(&self.de.path, i);
            if self.de.pruned.contains(&path) {
                continue;
            }
            return seed.deserialize(self.de.child(node, path)).map(Some);
        }
        Ok(None)
    }
}

struct MapAccess<'s, 'a, I> {
    de: &'s TreeDeserializer<'a>,
    entries: I,
    value: Option<(&'a Node, String)>,
}

impl<'de, 'a, I: Iterator<Item = &'a Entry>> de::MapAccess<'de> for MapAccess<'_, 'a, I> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        for e in self.entries.by_ref() {
            let path = child_key(&self.de.path, &e.key);
            if self.de.pruned.contains(&path) {
                continue;
            }
            let key = seed
                .deserialize(de::value::StrDeserializer::<DeError>::new(&e.key))
                .map_err(|err| err.at(&path))?;
            self.value = Some((&e.node, path));
            return Ok(Some(key));
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.value.take() {
            Some((node, path)) => seed.deserialize(self.de.child(node, path)),
            None => Err(de::Error::custom("value without a key")),
        }
    }
}

/// Deserializes `T` from the tree, pruning each failing node and retrying,
/// so every structural problem is found in one run. Returns the value built
/// from what remained (if anything did) and the problems, in file order.
pub(crate) fn deserialize_all<T: serde::de::DeserializeOwned>(
    root: &Node,
) -> (Option<T>, Vec<DeError>) {
    let mut pruned = HashSet::new();
    let mut errors = Vec::new();
    // Each failed round prunes one more path, so the loop is bounded by the
    // number of nodes (itself bounded by MAX_NODES).
    for _ in 0..=MAX_NODES {
        let de = TreeDeserializer {
            node: root,
            path: String::new(),
            pruned: &pruned,
        };
        match T::deserialize(de) {
            Ok(v) => return (Some(v), errors),
            Err(e) => {
                let path = e.path.clone().unwrap_or_default();
                let fatal = path.is_empty() || pruned.contains(&path);
                errors.push(e);
                if fatal {
                    return (None, errors);
                }
                pruned.insert(path);
            }
        }
    }
    (None, errors)
}

#[cfg(test)]
mod tests;
