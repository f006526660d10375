//! The JSON Schema of `lever.yaml`, generated from the raw types (so it
//! cannot drift from what the parser accepts) plus the values only the
//! code knows (the implemented backends).

use serde_json::Value;

use super::raw::RawConfig;
use crate::backend::Backend;

pub fn json_schema() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(RawConfig)).unwrap_or(Value::Null);
    if let Some(backend) = schema.pointer_mut("/properties/backend") {
        backend["enum"] = Value::from(Backend::names());
    }
    schema
}
