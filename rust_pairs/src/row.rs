//! A row as the layout parsers see it, and the one function that reads image references out of it.
//!
//! Every container (JSONL, JSON array, Parquet, MMPR) hands the layouts a JSON [`Value`]. Parquet
//! rows can carry image bytes (the `datasets` `Image()` feature is a struct `{bytes, path}`); those
//! bytes are not put into the `Value` (no base64, no copy into a JSON tree): they sit in the row's
//! side table [`Row::blobs`] and the `Value` holds a marker object `{"$vpa_blob": i}` in their
//! place. [`image_refs`] turns any image field — a path string, a list of paths, a `{bytes, path}`
//! struct, a list of structs, null — into [`ImageSrc`]s; the build then reads the paths or takes
//! the blobs. A marker in a JSON input (which has no blobs) names a blob that does not exist and
//! is rejected like any bad field.

use serde_json::Value;

/// Key of the marker object standing for embedded bytes inside a row's `Value`.
pub const BLOB_KEY: &str = "$vpa_blob";

/// One record as read from a container: its JSON value and the bytes its blob markers point at.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub value: Value,
    pub blobs: Vec<Vec<u8>>,
}

/// The marker that stands for blob `i` in a row's `Value`.
pub fn blob_marker(i: usize) -> Value {
    let mut m = serde_json::Map::new();
    m.insert(BLOB_KEY.to_string(), Value::from(i as u64));
    Value::Object(m)
}

/// Blob index of a marker object, if `v` is one.
pub fn blob_index(v: &Value) -> Option<usize> {
    let o = v.as_object()?;
    if o.len() != 1 {
        return None;
    }
    o.get(BLOB_KEY)?.as_u64().map(|i| i as usize)
}

/// Where one image of a record comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSrc {
    /// A path, absolute or relative to the image root (`--image-root`, or the input's folder).
    Path(String),
    /// Bytes embedded in the row: blob `index` of its [`Row`]; `name` is the struct's `path`
    /// (only for messages: the extension comes from the bytes' magic).
    Embedded { index: usize, name: Option<String> },
}

impl ImageSrc {
    /// How the image is named in rejects and provenance.
    pub fn label(&self) -> String {
        match self {
            ImageSrc::Path(p) => p.clone(),
            ImageSrc::Embedded { index, name: Some(n) } => format!("{n} (embedded bytes #{index})"),
            ImageSrc::Embedded { index, name: None } => format!("embedded bytes #{index}"),
        }
    }
}

/// The JSON type of a value, for reject reasons (layouts use it too).
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

fn one(v: &Value) -> Result<ImageSrc, String> {
    match v {
        Value::String(s) if s.trim().is_empty() => Err("empty image path".into()),
        Value::String(s) => Ok(ImageSrc::Path(s.clone())),
        Value::Object(_) if blob_index(v).is_some() => Ok(ImageSrc::Embedded { index: blob_index(v).unwrap(), name: None }),
        Value::Object(o) if o.contains_key("bytes") || o.contains_key("path") => {
            let name = match o.get("path") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.trim().is_empty() => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => return Err(format!("image struct: \"path\" must be a string, got {}", type_name(other))),
            };
            match o.get("bytes") {
                None | Some(Value::Null) => name.map(ImageSrc::Path).ok_or_else(|| "image struct has neither bytes nor a path".to_string()),
                Some(b) => match blob_index(b) {
                    Some(index) => Ok(ImageSrc::Embedded { index, name }),
                    None => Err(format!("image struct: \"bytes\" must be binary (a Parquet binary column), got {}", type_name(b))),
                },
            }
        }
        other => Err(format!("expected an image path or a {{bytes, path}} struct, got {}", type_name(other))),
    }
}

/// The images a field names, in order (the i-th fills the i-th `<image>` placeholder): a path
/// string, a `{bytes, path}` struct (bytes embedded, or only a path), a list of either, or null
/// (no image). An empty list is no image.
pub fn image_refs(v: &Value) -> Result<Vec<ImageSrc>, String> {
    match v {
        Value::Null => Ok(vec![]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, it)| one(it).map_err(|e| format!("item {i}: {e}")))
            .collect(),
        other => one(other).map(|s| vec![s]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_published_image_form() {
        let p = |s: &str| ImageSrc::Path(s.into());
        assert_eq!(image_refs(&json!("a.jpg")).unwrap(), vec![p("a.jpg")]);
        assert_eq!(image_refs(&json!(["a.jpg", "b.png"])).unwrap(), vec![p("a.jpg"), p("b.png")]);
        assert_eq!(image_refs(&json!(null)).unwrap(), vec![]);
        assert_eq!(image_refs(&json!([])).unwrap(), vec![]);
        let embedded = json!({"bytes": blob_marker(3), "path": "x.png"});
        assert_eq!(image_refs(&embedded).unwrap(), vec![ImageSrc::Embedded { index: 3, name: Some("x.png".into()) }]);
        let only_path = json!({"bytes": null, "path": "imgs/y.jpg"});
        assert_eq!(image_refs(&only_path).unwrap(), vec![p("imgs/y.jpg")]);
        let list = json!([{"bytes": blob_marker(0), "path": null}, {"bytes": blob_marker(1)}]);
        assert_eq!(
            image_refs(&list).unwrap(),
            vec![ImageSrc::Embedded { index: 0, name: None }, ImageSrc::Embedded { index: 1, name: None }]
        );
        assert_eq!(image_refs(&blob_marker(2)).unwrap(), vec![ImageSrc::Embedded { index: 2, name: None }]);
        assert!(image_refs(&json!("")).unwrap_err().contains("empty image path"));
        assert!(image_refs(&json!({"bytes": null, "path": null})).unwrap_err().contains("neither"));
        assert!(image_refs(&json!({"bytes": "aGk="})).unwrap_err().contains("must be binary"));
        assert!(image_refs(&json!([["a"]])).unwrap_err().contains("item 0"));
        assert!(image_refs(&json!(3)).unwrap_err().contains("got number"));
    }
}
