//! The OTLP messages Lever sends per request (spans and log records),
//! written straight into protobuf bytes: no intermediate structs, no
//! attribute strings copied. Field numbers are those of
//! opentelemetry-proto v1; the tests decode what is written here with the
//! prost messages of `super::proto` (and the integration tests with the
//! official Python bindings).

const LEN: u8 = 2;
const VARINT: u8 = 0;
const FIXED64: u8 = 1;

#[inline]
pub fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

#[inline]
pub fn varint_len(v: u64) -> usize {
    // Lengths and tags are almost always under 128 or 16384.
    if v < 1 << 7 {
        1
    } else if v < 1 << 14 {
        2
    } else {
        // 1 byte per started group of 7 bits.
        (64 - v.leading_zeros() as usize).div_ceil(7)
    }
}

#[inline]
fn key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    varint(buf, u64::from(field << 3 | u32::from(wire)));
}

#[inline]
fn key_len(field: u32) -> usize {
    varint_len(u64::from(field << 3))
}

/// A length-delimited field's header: key and length.
#[inline]
pub fn len_field(buf: &mut Vec<u8>, field: u32, len: usize) {
    key(buf, field, LEN);
    varint(buf, len as u64);
}

/// The encoded size of a length-delimited field whose content is `len`.
#[inline]
pub fn len_field_size(field: u32, len: usize) -> usize {
    key_len(field) + varint_len(len as u64) + len
}

#[inline]
pub fn bytes_field(buf: &mut Vec<u8>, field: u32, b: &[u8]) {
    len_field(buf, field, b.len());
    buf.extend_from_slice(b);
}

/// A string field made of `parts` (written as one string).
#[inline]
pub fn str_field(buf: &mut Vec<u8>, field: u32, parts: &[&str]) {
    len_field(buf, field, parts.iter().map(|p| p.len()).sum());
    for p in parts {
        buf.extend_from_slice(p.as_bytes());
    }
}

#[inline]
pub fn varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    key(buf, field, VARINT);
    varint(buf, v);
}

#[inline]
pub fn fixed64_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    key(buf, field, FIXED64);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// An attribute value (`AnyValue`).
#[derive(Debug, Clone, Copy)]
pub enum Val<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
}

impl Val<'_> {
    /// The size of the `AnyValue` message holding this value.
    #[inline]
    fn size(&self) -> usize {
        match self {
            Val::Str(s) => len_field_size(1, s.len()),
            Val::Bool(_) => 2,
            Val::Int(i) => 1 + varint_len(*i as u64),
            Val::Double(_) => 9,
        }
    }

    /// Writes the `AnyValue` message's content.
    #[inline]
    fn write(&self, buf: &mut Vec<u8>) {
        match self {
            Val::Str(s) => bytes_field(buf, 1, s.as_bytes()),
            Val::Bool(b) => varint_field(buf, 2, u64::from(*b)),
            Val::Int(i) => varint_field(buf, 3, *i as u64),
            Val::Double(d) => fixed64_field(buf, 4, d.to_bits()),
        }
    }
}

/// An `AnyValue` field.
pub fn any_field(buf: &mut Vec<u8>, field: u32, v: Val<'_>) {
    len_field(buf, field, v.size());
    v.write(buf);
}

/// A string `AnyValue` field made of `parts` (written as one string).
pub fn any_str_field(buf: &mut Vec<u8>, field: u32, parts: &[&str]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    len_field(buf, field, len_field_size(1, len));
    str_field(buf, 1, parts);
}

/// A `KeyValue` attribute at `field`, its key made of `key` parts (a
/// prefix and a name, say), so no key string is built.
pub fn attr(buf: &mut Vec<u8>, field: u32, key: &[&str], v: Val<'_>) {
    // Strings, the most common values, have their own short path.
    if let Val::Str(s) = v {
        return match key {
            [name] => str_attr(buf, field, "", name, s),
            [prefix, name] => str_attr(buf, field, prefix, name, s),
            _ => attr_long(buf, field, key, v),
        };
    }
    let klen: usize = key.iter().map(|k| k.len()).sum();
    let any = v.size();
    let inner = len_field_size(1, klen) + len_field_size(2, any);
    if field < 16 && inner < 128 {
        // Nearly every attribute: each tag and length is one byte, so the
        // header is written at once (the key's and value's lengths are
        // under `inner`).
        buf.reserve(2 + inner);
        buf.extend_from_slice(&[
            (field << 3) as u8 | LEN,
            inner as u8,
            1 << 3 | LEN,
            klen as u8,
        ]);
        for k in key {
            buf.extend_from_slice(k.as_bytes());
        }
        match v {
            // Not reached: strings took their own path above.
            Val::Str(_) => {
                buf.extend_from_slice(&[2 << 3 | LEN, any as u8]);
                v.write(buf);
            }
            // The value's own tag with its header: one write each.
            Val::Int(i) => {
                buf.extend_from_slice(&[2 << 3 | LEN, any as u8, 3 << 3 | VARINT]);
                varint(buf, i as u64);
            }
            Val::Bool(b) => buf.extend_from_slice(&[2 << 3 | LEN, 2, 2 << 3 | VARINT, b as u8]),
            Val::Double(d) => {
                buf.extend_from_slice(&[2 << 3 | LEN, 9, 4 << 3 | FIXED64]);
                buf.extend_from_slice(&d.to_bits().to_le_bytes());
            }
        }
        return;
    }
    attr_long(buf, field, key, v);
}

/// Any attribute, each tag and length written as a varint: what the short
/// paths fall back to when a length or the field does not fit a byte.
fn attr_long(buf: &mut Vec<u8>, field: u32, key: &[&str], v: Val<'_>) {
    let klen: usize = key.iter().map(|k| k.len()).sum();
    let any = v.size();
    let inner = len_field_size(1, klen) + len_field_size(2, any);
    buf.reserve(len_field_size(field, inner));
    len_field(buf, field, inner);
    len_field(buf, 1, klen);
    for k in key {
        buf.extend_from_slice(k.as_bytes());
    }
    len_field(buf, 2, any);
    v.write(buf);
}

/// A string attribute whose key is `prefix` then `name`: [`attr`]'s most
/// common case, with no parts to sum and no value to match.
#[inline]
pub fn str_attr(buf: &mut Vec<u8>, field: u32, prefix: &str, name: &str, v: &str) {
    let (k, s) = (prefix.len() + name.len(), v.len());
    // The key's field, then the value's field holding an `AnyValue` that
    // holds the string.
    let inner = 2 + k + 2 + 2 + s;
    if field >= 16 || inner >= 128 {
        return attr_long(buf, field, &[prefix, name], Val::Str(v));
    }
    // Every tag and length is one byte (each length is under `inner`).
    buf.reserve(2 + inner);
    buf.extend_from_slice(&[(field << 3) as u8 | LEN, inner as u8, 1 << 3 | LEN, k as u8]);
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(&[2 << 3 | LEN, (s + 2) as u8, 1 << 3 | LEN, s as u8]);
    buf.extend_from_slice(v.as_bytes());
}

/// A JSON value as an attribute value; `null` is left out, arrays and
/// objects become their JSON text.
pub fn json_attr(buf: &mut Vec<u8>, field: u32, key: &[&str], v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Null => {}
        Value::Bool(b) => attr(buf, field, key, Val::Bool(*b)),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => attr(buf, field, key, Val::Int(i)),
            (None, Some(d)) => attr(buf, field, key, Val::Double(d)),
            (None, None) => {}
        },
        Value::String(s) => attr(buf, field, key, Val::Str(s)),
        other => attr(buf, field, key, Val::Str(&other.to_string())),
    }
}

/// Span fields (`opentelemetry.proto.trace.v1.Span`).
pub mod span {
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START: u32 = 7;
    pub const END: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const STATUS: u32 = 15;
}

/// Log record fields (`opentelemetry.proto.logs.v1.LogRecord`).
pub mod log {
    pub const TIME: u32 = 1;
    pub const SEVERITY_NUMBER: u32 = 2;
    pub const SEVERITY_TEXT: u32 = 3;
    pub const BODY: u32 = 5;
    pub const ATTRIBUTES: u32 = 6;
    pub const TRACE_ID: u32 = 9;
    pub const SPAN_ID: u32 = 10;
    pub const OBSERVED_TIME: u32 = 11;
    pub const EVENT_NAME: u32 = 12;
}

/// A span's status: error (code 2) with `message`.
pub fn error_status(buf: &mut Vec<u8>, message: &str) {
    let inner = if message.is_empty() {
        0
    } else {
        len_field_size(2, message.len())
    } + 2;
    len_field(buf, span::STATUS, inner);
    if !message.is_empty() {
        bytes_field(buf, 2, message.as_bytes());
    }
    varint_field(buf, 3, 2);
}

/// One export request (`Export{Trace,Logs}ServiceRequest`): a single
/// resource and scope around `items`, each already framed as field 2 of
/// the scope message (`ScopeSpans.spans`, `ScopeLogs.log_records`).
/// `resource` and `scope` are the encoded `Resource` and
/// `InstrumentationScope` messages.
pub fn export_request(resource: &[u8], scope: &[u8], items: &[u8]) -> Vec<u8> {
    let mut out = export_head(resource, scope, items.len());
    out.extend_from_slice(items);
    out
}

/// What comes before `items_len` bytes of items in an export request
/// ([`export_request`] without the items, so they can be sent as they
/// are).
pub fn export_head(resource: &[u8], scope: &[u8], items_len: usize) -> Vec<u8> {
    let scoped = len_field_size(1, scope.len()) + items_len;
    let outer = len_field_size(1, resource.len()) + len_field_size(2, scoped);
    let mut out = Vec::with_capacity(len_field_size(1, outer) - items_len);
    len_field(&mut out, 1, outer);
    bytes_field(&mut out, 1, resource);
    len_field(&mut out, 2, scoped);
    bytes_field(&mut out, 1, scope);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_their_length() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut b = Vec::new();
            varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
            let mut got = 0u64;
            for (i, x) in b.iter().enumerate() {
                got |= u64::from(x & 0x7f) << (7 * i);
            }
            assert_eq!(got, v);
        }
    }

    #[test]
    fn attributes_decode_as_key_values() {
        use super::super::proto;
        use prost::Message;
        let long = "x".repeat(300);
        let cases: Vec<(Vec<&str>, Val<'_>, proto::any_value::Value)> = vec![
            (
                vec!["a"],
                Val::Str("b"),
                proto::any_value::Value::StringValue("b".into()),
            ),
            (
                vec!["lever.detail.", "n"],
                Val::Int(-5),
                proto::any_value::Value::IntValue(-5),
            ),
            (
                vec!["t"],
                Val::Bool(true),
                proto::any_value::Value::BoolValue(true),
            ),
            (vec!["z"], Val::Int(0), proto::any_value::Value::IntValue(0)),
            (
                vec!["n"],
                Val::Int(300),
                proto::any_value::Value::IntValue(300),
            ),
            (
                vec!["d"],
                Val::Double(-0.25),
                proto::any_value::Value::DoubleValue(-0.25),
            ),
            (
                vec!["d"],
                Val::Double(1.5),
                proto::any_value::Value::DoubleValue(1.5),
            ),
            (
                vec!["long", ""],
                Val::Str(&long),
                proto::any_value::Value::StringValue(long.clone()),
            ),
            // Around the one-byte lengths: `inner` of 127 and of 128.
            (
                vec!["k"],
                Val::Str(&long[..120]),
                proto::any_value::Value::StringValue(long[..120].into()),
            ),
            (
                vec!["k"],
                Val::Str(&long[..121]),
                proto::any_value::Value::StringValue(long[..121].into()),
            ),
            (
                vec![&long[..121]],
                Val::Bool(false),
                proto::any_value::Value::BoolValue(false),
            ),
            (
                vec![&long[..122]],
                Val::Bool(false),
                proto::any_value::Value::BoolValue(false),
            ),
        ];
        for (k, v, want) in cases {
            let mut b = Vec::new();
            attr(&mut b, 9, &k, v);
            // The short paths write what the general one does, byte for
            // byte (strings: a key of one or two parts).
            let mut long = Vec::new();
            attr_long(&mut long, 9, &k, v);
            assert_eq!(b, long, "{k:?}");
            // Field 9 of a Span is its attributes.
            let sp = proto::Span::decode(b.as_slice()).unwrap();
            assert_eq!(sp.attributes.len(), 1);
            assert_eq!(sp.attributes[0].key, k.concat());
            assert_eq!(sp.attributes[0].value.as_ref().unwrap().value, Some(want));
        }
    }
}
