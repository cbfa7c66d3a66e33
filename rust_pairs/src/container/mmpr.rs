//! InternVL / MMPR `meta.json`: a map of sources, each with its `annotation` (a JSONL file) and
//! `root` (the folder its image paths start from), e.g.
//!
//! ```json
//! {"scienceqa_multi_choice_en_20240402_extracted_pairs_vqa_format_rules": {
//!     "root": "MMPR/images/ScienceQA",
//!     "annotation": "MMPR/annotations/scienceqa_multi_choice_en_20240402_extracted_pairs_vqa_format_rules.jsonl",
//!     "data_augment": false, "repeat_time": 1, "length": 66457}}
//! ```
//!
//! One build reads every source. Relative paths are resolved from the meta file's folder, or, as
//! MMPR ships them (`MMPR/annotations/...` beside `MMPR/meta.json`), from the nearest folder above
//! it where the annotation exists; `root` is taken from the same folder (or from `--image-root`
//! when given). `repeat_time` and `length` are training-time sampling hints and are not applied:
//! every record is read once.

use super::{sniff, Input, Kind};
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Largest meta file parsed to check whether it is one (MMPR's is a few KB).
const MAX_META_BYTES: u64 = 16 << 20;

fn is_meta(v: &Value) -> bool {
    v.as_object().is_some_and(|o| {
        !o.is_empty() && o.values().all(|s| s.as_object().is_some_and(|s| s.get("annotation").is_some_and(Value::is_string)))
    })
}

/// Whether a file starting with `{` is an MMPR meta file: small, mentions `"annotation"` in its
/// first bytes, and parses as one object of sources.
pub fn looks_like_meta(path: &Path, head: &[u8], len: u64) -> Result<bool> {
    if len > MAX_META_BYTES || !head.windows(12).any(|w| w == b"\"annotation\"") {
        return Ok(false);
    }
    let data = read_regular(path)?;
    let data = data.strip_prefix(super::BOM).unwrap_or(&data);
    Ok(serde_json::from_slice::<Value>(data).is_ok_and(|v| is_meta(&v)))
}

/// A whole (small) meta file, opened as a regular file only.
fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let (mut f, meta) = super::open_regular(path)?;
    let mut data = Vec::with_capacity(meta.len().min(MAX_META_BYTES) as usize);
    std::io::Read::read_to_end(&mut f, &mut data).map_err(|e| Error::input(path, e))?;
    Ok(data)
}

fn bad(path: &Path, why: String) -> Error {
    Error::Input { path: path.to_path_buf(), source: std::io::Error::other(why) }
}

/// The annotation files of a meta file, each with its image root.
pub fn expand(meta_path: &Path, image_root: Option<&Path>) -> Result<Vec<Input>> {
    let data = read_regular(meta_path)?;
    let data = data.strip_prefix(super::BOM).unwrap_or(&data);
    let v: Value = serde_json::from_slice(data).map_err(|e| bad(meta_path, format!("malformed meta.json: {e}")))?;
    let Some(sources) = v.as_object().filter(|_| is_meta(&v)) else {
        return Err(bad(meta_path, "not an MMPR meta.json (an object of sources with \"annotation\")".into()));
    };
    let dir = meta_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut out = Vec::new();
    for (name, s) in sources {
        let ann = s["annotation"].as_str().unwrap_or_default();
        let root = match s.get("root") {
            None | Some(Value::Null) => None,
            Some(Value::String(r)) => Some(r.as_str()),
            Some(other) => return Err(bad(meta_path, format!("source {name:?}: \"root\" must be a string, got {other}"))),
        };
        let ann_path = Path::new(ann);
        // The folder relative paths start from: the meta file's, or the nearest one above where the annotation is.
        let base: PathBuf = if ann_path.is_absolute() {
            dir.clone()
        } else {
            dir.ancestors()
                .find(|b| b.join(ann_path).exists()) // a FIFO is found here and refused by `sniff`
                .map(Path::to_path_buf)
                .ok_or_else(|| bad(meta_path, format!("source {name:?}: annotation {ann} not found from {} or any folder above", dir.display())))?
        };
        let path = base.join(ann_path);
        let kind = sniff(&path)?;
        if kind == Kind::MmprMeta || kind == Kind::Parquet {
            return Err(bad(meta_path, format!("source {name:?}: annotation {} is not JSON lines or a JSON array", path.display())));
        }
        let root = root.map(|r| match image_root {
            Some(ir) if Path::new(r).is_relative() => ir.join(r),
            _ => base.join(r),
        });
        out.push(Input { label: path.to_string_lossy().to_string(), path, kind, image_root: root });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_sources_resolve_from_the_folder_that_holds_them() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("MMPR");
        std::fs::create_dir_all(m.join("annotations")).unwrap();
        std::fs::write(m.join("annotations/a.jsonl"), "{\"image\": \"1.png\"}\n").unwrap();
        std::fs::write(m.join("annotations/b.jsonl"), "[]").unwrap();
        let meta = m.join("meta.json");
        let text = r#"{"a": {"root": "MMPR/images/A", "annotation": "MMPR/annotations/a.jsonl", "repeat_time": 1},
                       "b": {"root": "images/B", "annotation": "annotations/b.jsonl", "length": 0}}"#;
        std::fs::write(&meta, text).unwrap();
        assert_eq!(sniff(&meta).unwrap(), Kind::MmprMeta);
        let got = expand(&meta, None).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].path.clone(), got[0].image_root.clone()), (m.join("annotations/a.jsonl"), Some(d.path().join("MMPR/images/A"))));
        assert_eq!(got[0].kind, Kind::Jsonl);
        assert_eq!((got[1].path.clone(), got[1].image_root.clone(), got[1].kind), (m.join("annotations/b.jsonl"), Some(m.join("images/B")), Kind::JsonArray));
        std::fs::write(&meta, r#"{"c": {"root": "x", "annotation": "nope.jsonl"}}"#).unwrap();
        assert!(expand(&meta, None).unwrap_err().to_string().contains("not found"));
        // A record that merely mentions "annotation" is JSON lines.
        std::fs::write(&meta, "{\"annotation\": \"x\", \"chosen\": \"a\"}\n").unwrap();
        assert_eq!(sniff(&meta).unwrap(), Kind::Jsonl);
    }
}
