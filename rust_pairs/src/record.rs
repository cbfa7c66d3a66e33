//! The data model shared by every stage: a validated record, its responses, and rejects.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a record came from: input file and 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Source {
    pub file: String,
    pub line: u64,
}

/// One candidate answer with its per-aspect scores (declared aspects only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub text: String,
    pub model: Option<String>,
    pub scores: BTreeMap<String, f64>,
}

/// A validated input record, ready to be grouped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub source: Source,
    /// Prompt as written, with `<image>` placeholders removed.
    pub prompt: String,
    /// Normalised prompt (dedup identity).
    pub prompt_norm: String,
    pub image_path: String,
    /// sha256 of the image bytes, hex.
    pub image_sha256: String,
    /// Where the validated image bytes sit in the build's scratch blob (so each image is read
    /// from its file once, and the shard gets exactly the bytes that were validated).
    #[serde(default)]
    pub image_offset: u64,
    #[serde(default)]
    pub image_len: u64,
    /// File extension for the shard member (`jpg`, `png`, ...).
    pub image_ext: String,
    pub responses: Vec<Response>,
    /// Explicit preferences (chosen index, rejected index) from pairwise inputs.
    pub explicit_pairs: Vec<(usize, usize)>,
}

/// Whether a whole record or one response inside a kept record was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejectKind {
    Record,
    Response,
}

/// One line of `rejects.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub file: String,
    pub line: u64,
    pub kind: RejectKind,
    pub field: String,
    pub reason: String,
}

impl Reject {
    pub fn record(src: &Source, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Reject { file: src.file.clone(), line: src.line, kind: RejectKind::Record, field: field.into(), reason: reason.into() }
    }
    pub fn response(src: &Source, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Reject { file: src.file.clone(), line: src.line, kind: RejectKind::Response, field: field.into(), reason: reason.into() }
    }
}
