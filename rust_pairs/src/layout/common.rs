//! Helpers shared by the layout parsers: typed field access whose errors name the field.

use super::{Ctx, Parsed};
use crate::record::Reject;
use crate::row::{image_refs, ImageSrc};
use serde_json::{Map, Value};

pub const PROMPT_KEYS: [&str; 4] = ["prompt", "question", "instruction", "query"];
pub const IMAGE_KEYS: [&str; 4] = ["img_path", "image", "image_path", "images"];

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

pub type FieldErr = (String, String);

pub fn err<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, FieldErr> {
    Err((field.into(), reason.into()))
}

/// First present key of `keys`; returns the key used and its value.
pub fn first<'v>(o: &'v Map<String, Value>, keys: &[&'static str]) -> Option<(&'static str, &'v Value)> {
    keys.iter().find_map(|k| o.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
}

pub fn check_text(field: &str, s: &str, ctx: &Ctx) -> Result<(), FieldErr> {
    if s.trim().is_empty() {
        return err(field, "empty text");
    }
    let n = s.chars().count();
    if n > ctx.max_text_chars {
        return err(field, format!("text is {n} characters, over the limit of {} (--max-text-chars)", ctx.max_text_chars));
    }
    Ok(())
}

pub fn string_field<'v>(o: &'v Map<String, Value>, keys: &[&'static str], what: &str) -> Result<(&'static str, &'v str), FieldErr> {
    match first(o, keys) {
        None if keys.len() == 1 => err(keys[0], "missing field"),
        None => err(keys[0], format!("missing field (expected one of {})", keys.join(", "))),
        Some((k, Value::String(s))) => Ok((k, s.as_str())),
        Some((k, other)) => err(k, format!("{what}: expected a string, got {}", type_name(other))),
    }
}

/// The record's images (see [`image_refs`]); no image field at all is a text-only record.
pub fn image_field(o: &Map<String, Value>) -> Result<Vec<ImageSrc>, FieldErr> {
    match first(o, &IMAGE_KEYS) {
        None => Ok(vec![]),
        Some((k, v)) => image_refs(v).map_err(|reason| (k.to_string(), reason)),
    }
}

pub fn record_reject(ctx: &Ctx, (field, reason): FieldErr) -> Parsed {
    Parsed { draft: Err(Reject::record(ctx.src, field, reason)), response_rejects: vec![] }
}

