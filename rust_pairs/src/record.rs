//! The data model shared by every stage: a validated record, its responses, and rejects.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a record came from: input file and 1-based line number. For a JSON array, `line` is the
/// line where the element starts and `index` its 0-based position in the array; for Parquet,
/// `line` is the 1-based row number over the whole file, `row_group` and `row` (0-based, within
/// the row group) say where it sits. (No `skip_serializing_if` here: records are spilled with
/// bincode, which needs every field; the JSON written for users leaves the `None`s out.)
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Source {
    pub file: String,
    pub line: u64,
    pub index: Option<u64>,
    pub row_group: Option<u64>,
    pub row: Option<u64>,
}

impl Source {
    pub fn line(file: impl Into<String>, line: u64) -> Source {
        Source { file: file.into(), line, ..Default::default() }
    }

    /// The JSON users see (sample `source`): file and line, plus index / row group / row when set.
    pub fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        o.insert("file".into(), self.file.clone().into());
        o.insert("line".into(), self.line.into());
        for (k, v) in [("index", self.index), ("row_group", self.row_group), ("row", self.row)] {
            if let Some(v) = v {
                o.insert(k.into(), v.into());
            }
        }
        serde_json::Value::Object(o)
    }
}

/// One candidate answer with its per-aspect scores (declared aspects only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub text: String,
    pub model: Option<String>,
    pub scores: BTreeMap<String, f64>,
}

/// Reference-model log-probs that a dataset ships for one explicit pair (MM-DPO's
/// `ref_win_logp`/`ref_rej_logp`), kept so a trainer can use them instead of recomputing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefLogps {
    pub chosen: f64,
    pub rejected: f64,
    /// Per-token averages, when shipped (`ref_win_avg_logp`/`ref_rej_avg_logp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_avg: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_avg: Option<f64>,
    /// The input fields they were read from.
    pub fields: String,
}

/// A validated input record, ready to be grouped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub source: Source,
    /// Prompt as written, with `<image>` placeholders removed (see [`crate::text::place_images`]).
    pub prompt: String,
    /// Where each image sits in `prompt` (char offsets, one per image; 0 when the prompt had no
    /// placeholder).
    #[serde(default)]
    pub image_at: Vec<usize>,
    /// Normalised prompt (dedup identity).
    pub prompt_norm: String,
    /// The record's images in placeholder order (0..N; none for a text-only record).
    pub images: Vec<ImageRef>,
    /// The record's videos in `<video>` placeholder order (0..N).
    pub videos: Vec<VideoRef>,
    /// Where each video sits in `prompt` (char offsets, as `image_at`).
    pub video_at: Vec<usize>,
    /// Identity of the media (see [`media_key`]: the image list's [`image_key`] when the record
    /// has no video): the dedup, partition and bucket key.
    pub image_key: String,
    pub responses: Vec<Response>,
    /// Explicit preferences (chosen index, rejected index) from pairwise inputs.
    pub explicit_pairs: Vec<(usize, usize)>,
    /// Shipped reference log-probs per explicit pair (same order), if any.
    #[serde(default)]
    pub pair_ref_logps: Vec<Option<RefLogps>>,
}

/// One validated image of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// The path it was read from, or the label of embedded bytes (provenance only).
    pub path: String,
    /// sha256 of the image bytes, hex.
    pub sha256: String,
    /// File extension for the shard member (`jpg`, `png`, ...), from the bytes' magic.
    pub ext: String,
    /// Where the validated bytes sit in the build's scratch blob (so each image is read once,
    /// and the shard gets exactly the bytes that were validated).
    pub offset: u64,
    pub len: u64,
}

/// One validated video of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoRef {
    /// The path it was read from, or the label of embedded bytes (provenance only).
    pub path: String,
    /// sha256 of the file's bytes; of a frame sequence, sha256 over its frames' sha256 hex
    /// digests joined by newlines (see [`crate::video::frames_sha256`]).
    pub sha256: String,
    pub kind: VideoKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VideoKind {
    /// A container file (`ext` from its structure), its bytes in the build's video scratch blob.
    File { ext: String, offset: u64, len: u64 },
    /// Frame images in order, their bytes (`offset`, `len`) in the video scratch blob too.
    Frames(Vec<ImageRef>),
}

impl VideoRef {
    /// Bytes the video puts into a shard.
    pub fn bytes(&self) -> u64 {
        match &self.kind {
            VideoKind::File { len, .. } => *len,
            VideoKind::Frames(f) => f.iter().map(|i| i.len).sum(),
        }
    }
}

/// Identity of a record's media: without videos, its image list's [`image_key`] (so keys, splits
/// and partitions of image data do not change); with videos, sha256 of the images' and the
/// videos' sha256s in order (the same prompt on other videos is another group).
pub fn media_key(images: &[&str], videos: &[&str]) -> String {
    if videos.is_empty() {
        return image_key(images.iter().copied());
    }
    crate::image::sha256_hex(format!("images:{}\nvideos:{}", images.join(","), videos.join(",")).as_bytes())
}

/// Identity of a record's image list: one image → its sha256 (as in format 1, so keys, splits and
/// partitions of single-image data do not change); several → sha256 of their sha256s joined by
/// `,` in order (the same images in another order are another list); none → `""`.
pub fn image_key<'a>(shas: impl IntoIterator<Item = &'a str>) -> String {
    let shas: Vec<&str> = shas.into_iter().collect();
    match shas.len() {
        0 => String::new(),
        1 => shas[0].to_string(),
        _ => crate::image::sha256_hex(shas.join(",").as_bytes()),
    }
}

/// What partitions, spill buckets and (for text-only records) the train/val split hash: the image
/// key, or for a record without images its normalised prompt (its dedup identity then).
pub fn anchor(image_key: &str, prompt_norm: &str) -> String {
    if image_key.is_empty() {
        format!("text\0{prompt_norm}")
    } else {
        image_key.to_string()
    }
}

/// Whether a whole record or one response inside a kept record was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejectKind {
    Record,
    Response,
}

/// One line of `rejects.jsonl`. `index` (JSON arrays), `row_group` and `row` (Parquet) are
/// present only for those containers (see [`Source`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub file: String,
    pub line: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_group: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<u64>,
    pub kind: RejectKind,
    pub field: String,
    pub reason: String,
}

impl Reject {
    pub fn record(src: &Source, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Reject::new(src, RejectKind::Record, field.into(), reason.into())
    }
    pub fn response(src: &Source, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Reject::new(src, RejectKind::Response, field.into(), reason.into())
    }
    fn new(src: &Source, kind: RejectKind, field: String, reason: String) -> Self {
        let Source { file, line, index, row_group, row } = src.clone();
        Reject { file, line, index, row_group, row, kind, field, reason }
    }
}
