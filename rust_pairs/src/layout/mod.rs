//! Layouts: what the fields of one record mean, apart from the container the record came in.
//!
//! Each layout family has its module ([`scored`]: VLFeedback and HelpSteer-style rated rows;
//! [`pairwise`]: rows with one explicit chosen/rejected pair (RLAIF-V, RLHF-V, SPA-VL, SeVa);
//! [`conversation`]: chat-turn layouts (TRL, POVID, LLaVA-RLHF); [`mmdpo`]: MM-DPO's DPO file,
//! whose Python-literal fields [`pylit`] reads without executing anything; [`mapped`]: any row
//! through `--field` declarations); [`detect`] guesses a file's layout from its first records,
//! `--format` forces it. A layout turns a JSON value into a [`Draft`]:
//! a record whose text and ratings are valid; its image is checked later (see [`crate::image`]).
//! A record-level problem rejects the record; a problem with one response (non-numeric rating,
//! empty text) rejects only that response.

pub mod common;
pub mod conversation;
pub mod detect;
pub mod mapped;
pub mod mmdpo;
pub mod pairwise;
pub mod pylit;
pub mod scored;

pub use detect::detect;
pub use scored::{fast_path_agrees, vlfeedback_fast};

use crate::config::Format;
use crate::record::{RefLogps, Reject, Response, Source};
use common::{record_reject, type_name};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub prompt: String,
    /// 0..N images in placeholder order (none: a text-only record); see [`crate::row::image_refs`].
    pub images: Vec<crate::row::ImageSrc>,
    /// Where each image sits in `prompt`: a char offset per image (see [`common::place`]).
    pub image_at: Vec<usize>,
    pub responses: Vec<Response>,
    pub explicit_pairs: Vec<(usize, usize)>,
    /// Shipped reference log-probs per explicit pair (same order as `explicit_pairs`).
    pub pair_ref_logps: Vec<Option<RefLogps>>,
}

#[derive(Debug)]
pub struct Parsed {
    pub draft: Result<Draft, Reject>,
    /// Responses dropped from a kept record (or from a record rejected later).
    pub response_rejects: Vec<Reject>,
}

/// Per-file context for parsing.
pub struct Ctx<'a> {
    pub src: &'a Source,
    pub aspects: &'a [(String, f64)],
    pub max_text_chars: usize,
    /// Ratings outside it reject their response (see [`crate::config::BuildConfig::rating_scale_for`]).
    pub rating_scale: Option<crate::config::RatingScale>,
    /// `--field` declarations (the mapped layout).
    pub fields: &'a [(String, String)],
    /// `--image-template`.
    pub image_template: Option<&'a str>,
}

impl<'a> Ctx<'a> {
    /// A context with no field mapping and no image template.
    pub fn plain(src: &'a Source, aspects: &'a [(String, f64)], max_text_chars: usize) -> Self {
        Ctx { src, aspects, max_text_chars, rating_scale: None, fields: &[], image_template: None }
    }
}


/// Fields that hold a record's videos in published layouts (MM-RLHF's `video` frame folder, ms-swift's and
/// LLaMA-Factory's `videos`).
const VIDEO_FIELDS: [&str; 2] = ["video", "videos"];

/// The video field a record fills, if any (null, an empty string, list or object fill none).
pub fn video_field(o: &serde_json::Map<String, Value>) -> Option<&'static str> {
    VIDEO_FIELDS.iter().copied().find(|k| match o.get(*k) {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.trim().is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(m)) => !m.is_empty(),
        Some(_) => true,
    })
}

/// Parse one record of a known layout.
pub fn parse(v: &Value, format: Format, ctx: &Ctx) -> Parsed {
    let Some(o) = v.as_object() else {
        return record_reject(ctx, ("$".into(), format!("expected a JSON object, got {}", type_name(v))));
    };
    // Its answers describe the video: built without it, the pair would silently train as a text-only one.
    if let Some(field) = video_field(o) {
        return record_reject(ctx, (field.into(), "the record has a video and this build reads images only: rejected \
            rather than built as a text-only pair whose answers describe a video it lacks".into()));
    }
    match format {
        Format::Vlfeedback => scored::vlfeedback(o, ctx),
        Format::Rated => scored::rated(o, ctx),
        Format::Pairwise => pairwise::parse(o, ctx),
        Format::Trl => conversation::trl(o, ctx),
        Format::Povid => conversation::povid(o, ctx),
        Format::LlavaRlhf => conversation::llava_rlhf(o, ctx),
        Format::Mmdpo => mmdpo::parse(o, ctx),
        Format::Mapped => mapped::parse(o, ctx),
        Format::Auto => record_reject(ctx, ("$".into(), "format could not be detected".into())),
    }
}
