//! Layouts: what the fields of one record mean, apart from the container the record came in.
//!
//! Each layout family has its module ([`scored`]: VLFeedback and HelpSteer-style rated rows;
//! [`pairwise`]: rows with one explicit chosen/rejected pair (RLAIF-V, RLHF-V, SPA-VL, SeVa);
//! [`conversation`]: chat-turn layouts (TRL, POVID, LLaVA-RLHF); [`mmdpo`]: MM-DPO's DPO file,
//! whose Python-literal fields [`pylit`] reads without executing anything; [`mapped`]: any row
//! through `--field` declarations; [`swift`]: ms-swift's RLHF rows); [`detect`] guesses a file's layout from its first records,
//! `--format` forces it. A layout turns a JSON value into a [`Draft`]:
//! a record whose text and ratings are valid; its image is checked later (see [`crate::image`]).
//! A record-level problem rejects the record; a problem with one response (non-numeric rating,
//! empty text) rejects only that response. A record's videos (`videos` / `video`, or
//! `--field video=...`) are read here for every layout ([`video_of`]), so that each layout
//! places their `<video>` placeholders beside its images' (see [`common::place`]).

pub mod common;
pub mod conversation;
pub mod detect;
pub mod mapped;
pub mod mmdpo;
pub mod pairwise;
pub mod pylit;
pub mod scored;
pub mod swift;

pub use detect::detect;
pub use scored::{fast_path_agrees, vlfeedback_fast};

use crate::config::Format;
use crate::record::{RefLogps, Reject, Response, Source};
use common::{err, get_path, record_reject, type_name, FieldErr};
use crate::video::{is_empty_field, video_refs, VideoSrc};
use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    pub prompt: String,
    /// 0..N images in placeholder order (none: a text-only record); see [`crate::row::image_refs`].
    pub images: Vec<crate::row::ImageSrc>,
    /// Where each image sits in `prompt`: a char offset per image (see [`common::place`]).
    pub image_at: Vec<usize>,
    /// 0..N videos in `<video>` placeholder order (see [`crate::video::video_refs`]).
    pub videos: Vec<VideoSrc>,
    /// Where each video sits in `prompt` (char offsets, as `image_at`).
    pub video_at: Vec<usize>,
    /// The field each video is named by in rejects (`videos[0]`, `video`, ...).
    pub video_fields: Vec<String>,
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
#[derive(Clone, Copy)]
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
    /// How many videos the record has (set by [`parse`] before the layout places its prompt).
    pub n_videos: usize,
}

impl<'a> Ctx<'a> {
    /// A context with no field mapping and no image template.
    pub fn plain(src: &'a Source, aspects: &'a [(String, f64)], max_text_chars: usize) -> Self {
        Ctx { src, aspects, max_text_chars, rating_scale: None, fields: &[], image_template: None, n_videos: 0 }
    }
}


/// Fields that hold a record's videos in published layouts (ms-swift's and LLaMA-Factory's
/// `videos`; MM-RLHF's and LLaVA-Hound's `video`, a frame folder).
pub const VIDEO_KEYS: [&str; 2] = ["videos", "video"];

/// The record's videos (none when no video field is filled: null, `""`, `[]` and `{}` fill none)
/// and the field each is named by in rejects. The mapped layout reads `--field video=PATH` when
/// declared; every layout reads [`VIDEO_KEYS`] otherwise.
pub fn video_of(o: &serde_json::Map<String, Value>, format: Format, ctx: &Ctx) -> Result<(Vec<VideoSrc>, Vec<String>), FieldErr> {
    let declared = (format == Format::Mapped).then(|| ctx.fields.iter().find(|(n, _)| n == "video")).flatten();
    let (key, v): (String, &Value) = match declared {
        Some((_, path)) => match get_path(o, path) {
            Some(v) => (path.clone(), v),
            None => return err(path, format!("missing field (declared by --field video={path})")),
        },
        None => {
            let filled: Vec<(&str, &Value)> =
                VIDEO_KEYS.iter().filter_map(|k| o.get(*k).filter(|v| !is_empty_field(v)).map(|v| (*k, v))).collect();
            match filled[..] {
                [] => return Ok((vec![], vec![])),
                [(k, v)] => (k.to_string(), v),
                _ => return err("video", "both videos and video are filled: which names the record's videos is ambiguous"),
            }
        }
    };
    let (videos, listed) = video_refs(v).map_err(|why| (key.clone(), why))?;
    let fields = (0..videos.len()).map(|i| if listed { format!("{key}[{i}]") } else { key.clone() }).collect();
    Ok((videos, fields))
}

/// Parse one record of a known layout.
pub fn parse(v: &Value, format: Format, ctx: &Ctx) -> Parsed {
    let Some(o) = v.as_object() else {
        return record_reject(ctx, ("$".into(), format!("expected a JSON object, got {}", type_name(v))));
    };
    let (videos, video_fields) = match video_of(o, format, ctx) {
        Ok(v) => v,
        Err(e) => return record_reject(ctx, e),
    };
    let ctx = &Ctx { n_videos: videos.len(), ..*ctx };
    let mut parsed = match format {
        Format::Vlfeedback => scored::vlfeedback(o, ctx),
        Format::Rated => scored::rated(o, ctx),
        Format::Pairwise => pairwise::parse(o, ctx),
        Format::Trl => conversation::trl(o, ctx),
        Format::Povid => conversation::povid(o, ctx),
        Format::LlavaRlhf => conversation::llava_rlhf(o, ctx),
        Format::Mmdpo => mmdpo::parse(o, ctx),
        Format::MsSwift => swift::parse(o, ctx),
        Format::Mapped => mapped::parse(o, ctx),
        Format::Auto => record_reject(ctx, ("$".into(), "format could not be detected".into())),
    };
    if let Ok(d) = &mut parsed.draft {
        debug_assert_eq!(d.video_at.len(), videos.len(), "the layout placed every video");
        d.videos = videos;
        d.video_fields = video_fields;
    }
    parsed
}
