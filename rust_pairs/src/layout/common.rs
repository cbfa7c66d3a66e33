//! Helpers shared by the layout parsers: typed field access whose errors name the field.

use super::{Ctx, Draft, Parsed};
use crate::record::{Reject, RefLogps, Response};
use crate::row::{image_refs, ImageSrc};
use crate::text::{place_markers, IMAGE_MARKER};
use crate::video::VIDEO_MARKER;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub const PROMPT_KEYS: [&str; 4] = ["prompt", "question", "instruction", "query"];
/// `image_id` is SeVa's (a file name under `--image-root`).
pub const IMAGE_KEYS: [&str; 5] = ["img_path", "image", "image_path", "images", "image_id"];

pub use crate::row::type_name;

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

/// Where a record's images and videos sit in its stored prompt (see [`place`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub prompt: String,
    pub image_at: Vec<usize>,
    pub video_at: Vec<usize>,
}

/// The stored prompt of `raw` (field `field`) and the char offset of each of its `n_images`
/// images and `n_videos` videos in it (see [`place_markers`]). `<image>` placeholders name the
/// images in order and `<video>` placeholders the videos; a prompt without any placeholder of a
/// kind places every item of that kind before its text (offset 0, LLaVA's convention: its training
/// code puts `<image>\n` first when the prompt has none). A prompt with placeholders of a kind
/// must have one per item: a different count is rejected (as transformers' processors refuse a
/// mismatch between image or video tokens and the media), never guessed.
pub fn place(field: &str, raw: &str, n_images: usize, n_videos: usize) -> Result<Placed, FieldErr> {
    let (prompt, at) = place_markers(raw, &[IMAGE_MARKER, VIDEO_MARKER]);
    let of = |kind: usize, n: usize, marker: &str, what: &str| -> Result<Vec<usize>, FieldErr> {
        let found: Vec<usize> = at.iter().filter(|(k, _)| *k == kind).map(|(_, o)| *o).collect();
        match found.len() {
            0 => Ok(vec![0; n]),
            k if k == n => Ok(found),
            k => err(
                field,
                format!(
                    "{k} {marker} placeholder{} in the prompt but {n} {what}{}: each placeholder names one {what}",
                    if k == 1 { "" } else { "s" },
                    if n == 1 { "" } else { "s" }
                ),
            ),
        }
    };
    let image_at = of(0, n_images, IMAGE_MARKER, "image")?;
    let video_at = of(1, n_videos, VIDEO_MARKER, "video")?;
    Ok(Placed { prompt, image_at, video_at })
}

pub fn record_reject(ctx: &Ctx, (field, reason): FieldErr) -> Parsed {
    Parsed { draft: Err(Reject::record(ctx.src, field, reason)), response_rejects: vec![] }
}


/// A value at a dotted path (`answers.good`, `completions.0.response`; numbers index lists).
pub fn get_path<'v>(o: &'v Map<String, Value>, path: &str) -> Option<&'v Value> {
    let mut parts = path.split('.');
    let mut v = o.get(parts.next()?)?;
    for p in parts {
        v = match v {
            Value::Object(m) => m.get(p)?,
            Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    (!v.is_null()).then_some(v)
}

/// Check an `--image-template`: `{path}` placeholders (dotted paths), `{{`/`}}` for braces.
pub fn check_template(t: &str) -> Result<(), String> {
    let mut fields = 0;
    template_parts(t, |part| {
        if let Part::Field(f) = part {
            if f.is_empty() || f.split('.').any(str::is_empty) {
                return Err(format!("{{{f}}} in {t:?} is not a dotted field path"));
            }
            fields += 1;
        }
        Ok(())
    })?;
    if fields == 0 {
        return Err(format!("{t:?} names no field (write e.g. \"merged_images/{{id}}.jpg\")"));
    }
    Ok(())
}

enum Part<'a> {
    Lit(&'a str),
    Field(&'a str),
}

fn template_parts<'a>(t: &'a str, mut f: impl FnMut(Part<'a>) -> Result<(), String>) -> Result<(), String> {
    let mut rest = t;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{{") {
            f(Part::Lit("{"))?;
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            f(Part::Lit("}"))?;
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| format!("unclosed {{ in {t:?}"))?;
            f(Part::Field(&r[..end]))?;
            rest = &r[end + 1..];
        } else if rest.starts_with('}') {
            return Err(format!("unmatched }} in {t:?}"));
        } else {
            let end = rest.find(['{', '}']).unwrap_or(rest.len());
            f(Part::Lit(&rest[..end]))?;
            rest = &rest[end..];
        }
    }
    Ok(())
}

/// Fill a template from the row's fields (strings and numbers).
pub fn fill_template(t: &str, o: &Map<String, Value>) -> Result<String, FieldErr> {
    let mut out = String::new();
    let mut bad: Option<FieldErr> = None;
    template_parts(t, |part| {
        match part {
            Part::Lit(l) => out.push_str(l),
            Part::Field(f) => match get_path(o, f) {
                Some(Value::String(s)) if !s.trim().is_empty() => out.push_str(s),
                Some(Value::Number(n)) => out.push_str(&n.to_string()),
                Some(other) => bad = Some((f.to_string(), format!("image template {t:?}: expected a string or number, got {}", type_name(other)))),
                None => bad = Some((f.to_string(), format!("missing field (the image template {t:?} needs it)"))),
            },
        }
        Ok(())
    })
    .map_err(|e| ("image".to_string(), e))?;
    match bad {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// The record's images: `--image-template` when given (one path), else the row's image field
/// (see [`image_field`]; none at all is a text-only record), else the layout's own template
/// (`default_template`, e.g. VLFeedback's `merged_images/{id}.jpg`).
pub fn image_of(o: &Map<String, Value>, ctx: &Ctx, default_template: Option<&str>) -> Result<Vec<ImageSrc>, FieldErr> {
    if let Some(t) = ctx.image_template {
        return fill_template(t, o).map(|p| vec![ImageSrc::Path(p)]);
    }
    match default_template {
        Some(t) if first(o, &IMAGE_KEYS).is_none() => fill_template(t, o).map(|p| vec![ImageSrc::Path(p)]).map_err(|(_, why)| {
            ("image".to_string(), format!("missing field (expected one of {}), and the layout's default image path cannot be built: {why}", IMAGE_KEYS.join(", ")))
        }),
        // MM-RLHF-style video rows may carry an empty image beside the video: that names no image.
        _ if ctx.n_videos > 0 && first(o, &IMAGE_KEYS).is_some_and(|(_, v)| v.as_str().is_some_and(|s| s.trim().is_empty())) => Ok(vec![]),
        _ => image_field(o),
    }
}

/// Text of a message's content: a string, or the text blocks of a list of
/// `{type: text|image, ...}` blocks (TRL, OpenAI-style), consecutive text blocks joined by
/// newlines. With `images`, each image block becomes an `<image>` placeholder and each video block
/// a `<video>` placeholder where it stands (no separator: the blocks render back to back), so
/// [`place`] records its position; without, media blocks are skipped (answers).
pub fn content_text(v: &Value, images: bool) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(blocks) => {
            let mut out = String::new();
            let mut after_text = false;
            let text = |out: &mut String, t: &str, after_text: &mut bool| {
                if *after_text {
                    out.push('\n');
                }
                out.push_str(t);
                *after_text = true;
            };
            for b in blocks {
                match b {
                    Value::String(s) => text(&mut out, s, &mut after_text),
                    Value::Object(m) => match m.get("type").and_then(Value::as_str) {
                        Some("text") => text(&mut out, m.get("text").and_then(Value::as_str)?, &mut after_text),
                        Some("image") if images => {
                            out.push_str(IMAGE_MARKER);
                            after_text = false;
                        }
                        Some("video") if images => {
                            out.push_str(VIDEO_MARKER);
                            after_text = false;
                        }
                        Some(_) => {} // images or videos of an answer, audio, ...
                        None => text(&mut out, m.get("text").and_then(Value::as_str)?, &mut after_text),
                    },
                    _ => return None,
                }
            }
            Some(out)
        }
        _ => None,
    }
}

/// `(role, text)` of one turn: LLaVA's `{from, value}` or chat `{role, content}`.
/// With `images`, image blocks become `<image>` placeholders (see [`content_text`]).
pub fn turn(v: &Value, images: bool) -> Option<(&str, String)> {
    let t = v.as_object()?;
    let role = t.get("from").or_else(|| t.get("role"))?.as_str()?;
    let text = content_text(t.get("value").or_else(|| t.get("content"))?, images)?;
    Some((role, text))
}

pub fn is_assistant(role: &str) -> bool {
    matches!(role, "gpt" | "assistant" | "model" | "llava" | "bot")
}

pub fn is_user(role: &str) -> bool {
    matches!(role, "human" | "user")
}

/// An answer: a plain string, one assistant turn, or the last assistant turn of a conversation.
pub fn answer(v: &Value, field: &str) -> Result<String, FieldErr> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Object(_) => match turn(v, false) {
            Some((_, text)) => Ok(text),
            None => err(field, "expected a turn {from, value} or {role, content} with text"),
        },
        Value::Array(turns) => turns
            .iter()
            .rev()
            .find_map(|t| turn(t, false).filter(|(r, _)| is_assistant(r)).map(|(_, x)| x))
            .ok_or_else(|| (field.to_string(), "conversation has no assistant turn".to_string())),
        other => err(field, format!("expected a string or a conversation, got {}", type_name(other))),
    }
}

/// The user turn of a conversation (`field` names it in errors). A single user turn is the
/// prompt; several user turns would need a multi-turn sample, which the shard format has not.
pub fn user_prompt(v: &Value, field: &str) -> Result<String, FieldErr> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Object(_) => turn(v, true).map(|(_, x)| x).ok_or_else(|| (field.to_string(), "expected a turn {from, value} or {role, content} with text".to_string())),
        Value::Array(turns) => {
            // A system turn would be lost in a one-prompt sample: say so rather than drop it.
            if turns.iter().filter_map(|t| turn(t, true)).any(|(r, _)| r == "system") {
                return err(field, "a system turn: the sample holds one user prompt, a system prompt would be lost");
            }
            let users: Vec<String> = turns.iter().filter_map(|t| turn(t, true)).filter(|(r, _)| is_user(r)).map(|(_, x)| x).collect();
            match users.len() {
                0 => err(field, "no human/user turn"),
                1 => Ok(users.into_iter().next().unwrap()),
                n => err(field, format!("multi-turn context ({n} user turns): one user turn per sample is supported")),
            }
        }
        other => err(field, format!("expected a string or a list of turns, got {}", type_name(other))),
    }
}

/// A draft with one explicit pair (chosen = response 0) after checking the texts.
pub fn pair_draft(
    ctx: &Ctx,
    (pk, prompt): (&str, &str),
    images: Vec<ImageSrc>,
    (ck, chosen): (&str, String),
    (rk, rejected): (&str, String),
    models: (Option<String>, Option<String>),
    ref_logps: Option<RefLogps>,
) -> Result<Draft, FieldErr> {
    let Placed { prompt, image_at, video_at } = place(pk, prompt, images.len(), ctx.n_videos)?;
    check_text(pk, &prompt, ctx)?;
    check_text(ck, &chosen, ctx)?;
    check_text(rk, &rejected, ctx)?;
    let responses = vec![
        Response { text: chosen, model: models.0, scores: BTreeMap::new() },
        Response { text: rejected, model: models.1, scores: BTreeMap::new() },
    ];
    Ok(Draft { prompt, images, image_at, video_at, responses, explicit_pairs: vec![(0, 1)], pair_ref_logps: vec![ref_logps], ..Draft::default() })
}

pub fn finish(ctx: &Ctx, res: Result<Draft, FieldErr>) -> Parsed {
    match res {
        Ok(d) => Parsed { draft: Ok(d), response_rejects: vec![] },
        Err(e) => record_reject(ctx, e),
    }
}

#[cfg(test)]
mod tests {
    use super::place;

    #[test]
    fn placeholders_name_one_image_each() {
        let p = |raw, n| place("q", raw, n, 0).map(|p| (p.prompt, p.image_at));
        assert_eq!(p("<image>\nWhat?", 1), Ok(("What?".into(), vec![0])));
        assert_eq!(p("What?", 2), Ok(("What?".into(), vec![0, 0])));
        assert_eq!(p("What?", 0), Ok(("What?".into(), vec![])));
        let (field, why) = place("question", "<image> and <image>?", 1, 0).unwrap_err();
        assert_eq!(field, "question");
        assert!(why.contains("2 <image> placeholders in the prompt but 1 image"), "{why}");
        assert!(p("<image> What?", 0).unwrap_err().1.contains("but 0 images"));
    }

    #[test]
    fn placeholders_name_one_video_each_beside_images() {
        let got = place("q", "Compare <image> with <video>: same scene?", 1, 1).unwrap();
        assert_eq!((got.prompt.as_str(), got.image_at, got.video_at), ("Compare  with : same scene?", vec![8], vec![14]));
        // Videos without a placeholder go first, whatever the images do.
        let got = place("q", "<image>\nWhat moves?", 1, 2).unwrap();
        assert_eq!((got.image_at, got.video_at), (vec![0], vec![0, 0]));
        let (_, why) = place("q", "<video>\nWhat?", 0, 0).unwrap_err();
        assert!(why.contains("1 <video> placeholder in the prompt but 0 videos"), "{why}");
        assert!(place("q", "<video><video> Q", 0, 1).unwrap_err().1.contains("2 <video> placeholders in the prompt but 1 video:"));
    }
}
