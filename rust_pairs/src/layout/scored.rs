//! Scored layouts: several rated responses per prompt, ranked by the build.
//!
//! VLFeedback rows (Silkie), in row form or the column form where `completions` is an object
//! of lists, and HelpSteer-style rated rows (`responses` with `scores`, or the scores beside the
//! text). Includes the typed fast path for the common valid VLFeedback row.

use super::common::*;
use super::{Ctx, Draft, Parsed};
use crate::config::MAX_ABS_RATING;
use crate::record::{Reject, Response};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// A rating is a finite number, or a string holding one ("4", " 3.5 ").
fn rating(v: &Value) -> Result<f64, String> {
    let x = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        Value::Object(o) => return o.iter().find(|(k, _)| k.eq_ignore_ascii_case("rating")).map_or_else(
            || Err("rating object has no \"Rating\" field".to_string()),
            |(_, r)| rating(r),
        ),
        other => return Err(format!("expected a numeric rating, got {}", type_name(other))),
    };
    match x {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(format!("non-numeric rating {}", v)),
    }
}

/// A numeric rating must lie on the scale in force (or within ±1e15 when none is known), so
/// means and margins stay finite.
pub(crate) fn on_scale(x: f64, ctx: &Ctx) -> Result<(), String> {
    match ctx.rating_scale {
        Some(s) if !(s.lo..=s.hi).contains(&x) => Err(format!(
            "rating {x} is outside {} {}..{} (declare the scale with --rating-range LO:HI)",
            s.origin, s.lo, s.hi
        )),
        _ if x.abs() > MAX_ABS_RATING => Err(format!("rating {x} is beyond ±1e15 (declare the scale with --rating-range LO:HI)")),
        _ => Ok(()),
    }
}

/// Look up each declared aspect (case-insensitively) in `scores`.
fn aspect_scores(scores: &Map<String, Value>, field: &str, ctx: &Ctx) -> Result<BTreeMap<String, f64>, FieldErr> {
    let mut out = BTreeMap::new();
    for (name, _) in ctx.aspects {
        let found = scores.iter().find(|(k, _)| k.eq_ignore_ascii_case(name));
        match found {
            None => return err(format!("{field}.{name}"), "missing rating for a declared aspect"),
            Some((k, v)) => {
                let r = rating(v).and_then(|r| on_scale(r, ctx).map(|()| r)).map_err(|reason| (format!("{field}.{k}"), reason))?;
                out.insert(name.clone(), r);
            }
        }
    }
    Ok(out)
}

fn optional_model(o: &Map<String, Value>, field: &str) -> Result<Option<String>, FieldErr> {
    match o.get("model") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => err(format!("{field}.model"), format!("expected a string, got {}", type_name(other))),
    }
}

/// Where the raw VLFeedback release keeps a row's image when the row has no `img_path`.
pub const VLFEEDBACK_IMAGE: &str = "merged_images/{id}.jpg";

/// VLFeedback rows: `completions` with `annotations` per aspect.
pub fn vlfeedback(o: &Map<String, Value>, ctx: &Ctx) -> Parsed {
    scored(o, ctx, "completions", vlfeedback_response, Some(VLFEEDBACK_IMAGE))
}

/// HelpSteer-style rated rows: `responses` with `scores`.
pub fn rated(o: &Map<String, Value>, ctx: &Ctx) -> Parsed {
    if !o.contains_key("responses") && o.contains_key("response") {
        return one_response_row(o, ctx);
    }
    scored(o, ctx, "responses", rated_response, None)
}

/// HelpSteer as released (nvidia/HelpSteer): one rated response per row, `{prompt, response,
/// helpfulness, correctness, ...}`. Rows with the same prompt (and images) merge into one group
/// in dedup, as MM-DPO's notebooks `groupby` the prompt.
fn one_response_row(o: &Map<String, Value>, ctx: &Ctx) -> Parsed {
    let res = (|| -> Result<Draft, FieldErr> {
        let (pk, prompt) = string_field(o, &PROMPT_KEYS, "prompt")?;
        let images = image_of(o, ctx, None)?;
        let Placed { prompt, image_at, video_at } = place(pk, prompt, images.len(), ctx.n_videos)?;
        check_text(pk, &prompt, ctx)?;
        let r = rated_response(o, "$", ctx).map_err(|(f, why)| (f.trim_start_matches("$.").to_string(), why))?;
        Ok(Draft { prompt, images, image_at, video_at, responses: vec![r], ..Draft::default() })
    })();
    finish(ctx, res)
}

type ResponseParser = fn(&Map<String, Value>, &str, &Ctx) -> Result<Response, FieldErr>;

fn vlfeedback_response(c: &Map<String, Value>, field: &str, ctx: &Ctx) -> Result<Response, FieldErr> {
    let (_, text) = string_field(c, &["response"], "response").map_err(|(f, r)| (format!("{field}.{f}"), r))?;
    check_text(&format!("{field}.response"), text, ctx)?;
    let model = optional_model(c, field)?;
    let scores = match c.get("annotations") {
        Some(Value::Object(a)) => aspect_scores(a, &format!("{field}.annotations"), ctx)?,
        Some(other) => return err(format!("{field}.annotations"), format!("expected an object, got {}", type_name(other))),
        None if ctx.aspects.is_empty() => BTreeMap::new(),
        None => return err(format!("{field}.annotations"), "missing field"),
    };
    Ok(Response { text: text.to_string(), model, scores })
}

fn rated_response(c: &Map<String, Value>, field: &str, ctx: &Ctx) -> Result<Response, FieldErr> {
    let (k, text) = string_field(c, &["text", "response"], "response").map_err(|(f, r)| (format!("{field}.{f}"), r))?;
    check_text(&format!("{field}.{k}"), text, ctx)?;
    let model = optional_model(c, field)?;
    // Scores either nested under "scores" or flat beside the text (HelpSteer rows).
    let scores = match c.get("scores") {
        Some(Value::Object(s)) => aspect_scores(s, &format!("{field}.scores"), ctx)?,
        Some(other) => return err(format!("{field}.scores"), format!("expected an object, got {}", type_name(other))),
        None => aspect_scores(c, field, ctx)?,
    };
    Ok(Response { text: text.to_string(), model, scores })
}

/// Rows of completions, or the column form `{"model": [...], "response": [...], ...}` turned into rows.
fn rows<'v>(v: &'v Value, key: &str) -> Result<Vec<Cow<'v, Map<String, Value>>>, FieldErr> {
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, it)| match it {
                Value::Object(m) => Ok(Cow::Borrowed(m)),
                other => err(format!("{key}[{i}]"), format!("expected an object, got {}", type_name(other))),
            })
            .collect(),
        Value::Object(cols) => {
            let mut n: Option<usize> = None;
            for (name, col) in cols {
                let Value::Array(a) = col else {
                    return err(format!("{key}.{name}"), format!("column form: expected a list, got {}", type_name(col)));
                };
                match n {
                    None => n = Some(a.len()),
                    Some(m) if m != a.len() => {
                        return err(format!("{key}.{name}"), format!("column form: list has {} items, others have {m}", a.len()))
                    }
                    _ => {}
                }
            }
            Ok((0..n.unwrap_or(0))
                .map(|i| Cow::Owned(cols.iter().map(|(name, col)| (name.clone(), col[i].clone())).collect()))
                .collect())
        }
        other => err(key, format!("expected a list (or column object), got {}", type_name(other))),
    }
}

fn scored(o: &Map<String, Value>, ctx: &Ctx, key: &'static str, parse_one: ResponseParser, default_image: Option<&str>) -> Parsed {
    type Head<'a> = (Placed, Vec<crate::row::ImageSrc>, Vec<Cow<'a, Map<String, Value>>>);
    let head = (|| -> Result<Head, FieldErr> {
        let (pk, prompt) = string_field(o, &PROMPT_KEYS, "prompt")?;
        let images = image_of(o, ctx, default_image)?;
        let placed = place(pk, prompt, images.len(), ctx.n_videos)?;
        check_text(pk, &placed.prompt, ctx)?;
        let list = o.get(key).ok_or_else(|| (key.to_string(), "missing field".to_string()))?;
        Ok((placed, images, rows(list, key)?))
    })();
    let (Placed { prompt, image_at, video_at }, images, items) = match head {
        Ok(h) => h,
        Err(e) => return record_reject(ctx, e),
    };
    let mut responses = Vec::new();
    let mut response_rejects = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match parse_one(item, &format!("{key}[{i}]"), ctx) {
            Ok(r) => responses.push(r),
            Err((field, reason)) => response_rejects.push(Reject::response(ctx.src, field, reason)),
        }
    }
    let draft = if responses.is_empty() {
        let why = if items.is_empty() { "no responses" } else { "no rankable response (all were rejected)" };
        Err(Reject::record(ctx.src, key, why))
    } else {
        Ok(Draft { prompt, images, image_at, video_at, responses, ..Draft::default() })
    };
    Parsed { draft, response_rejects }
}

/// A JSON string, borrowed from the input when it holds no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A rating as [`rating`] reads it: `None` when [`rating`] would reject it (or when an object
/// holds several "rating" keys, where the `Value` path's choice depends on key order).
struct FastRating(Option<f64>);

impl<'de> serde::Deserialize<'de> for FastRating {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FastRating;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a rating")
            }
            fn visit_u64<E>(self, x: u64) -> Result<FastRating, E> {
                Ok(FastRating(Some(x as f64)))
            }
            fn visit_i64<E>(self, x: i64) -> Result<FastRating, E> {
                Ok(FastRating(Some(x as f64)))
            }
            fn visit_f64<E>(self, x: f64) -> Result<FastRating, E> {
                Ok(FastRating(Some(x).filter(|x| x.is_finite())))
            }
            fn visit_str<E>(self, s: &str) -> Result<FastRating, E> {
                Ok(FastRating(s.trim().parse::<f64>().ok().filter(|x| x.is_finite())))
            }
            fn visit_bool<E>(self, _: bool) -> Result<FastRating, E> {
                Ok(FastRating(None))
            }
            fn visit_unit<E>(self) -> Result<FastRating, E> {
                Ok(FastRating(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<FastRating, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(FastRating(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<FastRating, A::Error> {
                let mut found: Option<Option<f64>> = None;
                let mut ambiguous = false;
                while let Some(k) = a.next_key::<Text>()? {
                    if k.0.eq_ignore_ascii_case("rating") {
                        ambiguous |= found.is_some();
                        found = Some(a.next_value::<FastRating>()?.0);
                    } else {
                        a.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(FastRating(if ambiguous { None } else { found.flatten() }))
            }
        }
        d.deserialize_any(V)
    }
}

/// Annotations as (aspect as written, rating) entries, rationales skipped unread.
struct FastAnnotations<'a>(Vec<(Cow<'a, str>, Option<f64>)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for FastAnnotations<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FastAnnotations<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of ratings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<FastAnnotations<'de>, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = a.next_key::<Text>()? {
                    out.push((k.0, a.next_value::<FastRating>()?.0));
                }
                Ok(FastAnnotations(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(serde::Deserialize)]
struct FastCompletion<'a> {
    #[serde(borrow)]
    model: Option<Text<'a>>,
    #[serde(borrow)]
    response: Option<Text<'a>>,
    #[serde(borrow)]
    annotations: Option<FastAnnotations<'a>>,
}

#[derive(serde::Deserialize)]
struct FastRow<'a> {
    #[serde(borrow)]
    prompt: Option<Text<'a>>,
    #[serde(borrow)]
    img_path: Option<Text<'a>>,
    #[serde(borrow)]
    completions: Option<Vec<FastCompletion<'a>>>,
}

/// Fast path for the common, valid VLFeedback row (`prompt`, `img_path`, a list of completions):
/// typed, borrowing deserialisation that skips the rationales instead of building a `Value`
/// tree (which was the largest cost of validation). It gives up (`None`) on anything else —
/// other key spellings, the column form, duplicate keys, any invalid text or rating — and the
/// `Value` path then parses the record and reports each problem by field. Where it answers, it
/// answers exactly what [`parse`] does (tested below).
/// Any JSON value, read as strictly as `serde_json::Value` reads it (every string's escapes
/// decoded, so a lone `\uDC00` surrogate fails; every number parsed, so `1e999` fails) but kept
/// nowhere. `IgnoredAny`, which the typed path uses for fields it skips, checks neither.
struct Strict;

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Strict;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_unit<E>(self) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Strict, A::Error> {
                while a.next_element::<Strict>()?.is_some() {}
                Ok(Strict)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Strict, A::Error> {
                while a.next_entry::<Strict, Strict>()?.is_some() {}
                Ok(Strict)
            }
        }
        d.deserialize_any(V)
    }
}

pub fn vlfeedback_fast(text: &str, ctx: &Ctx) -> Option<Draft> {
    if ctx.aspects.is_empty() || ctx.image_template.is_some() {
        return None; // absent vs null annotations differ then; leave it to the Value path
    }
    if text.contains("\"video") {
        return None; // a record with a video field: the Value path reads it (see `super::video_of`)
    }
    let row: FastRow = serde_json::from_str(text).ok()?;
    let Placed { prompt, image_at, .. } = place("prompt", &row.prompt?.0, 1, 0).ok()?;
    check_text("prompt", &prompt, ctx).ok()?;
    let image = row.img_path?.0;
    if image.trim().is_empty() {
        return None;
    }
    let completions = row.completions?;
    let mut responses = Vec::with_capacity(completions.len());
    for c in completions {
        let text = c.response?.0;
        check_text("response", &text, ctx).ok()?;
        let ann = c.annotations?.0;
        let mut scores = BTreeMap::new();
        for (name, _) in ctx.aspects {
            let mut hits = ann.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name));
            let (_, r) = hits.next()?;
            if hits.next().is_some() {
                return None;
            }
            let x = (*r)?;
            on_scale(x, ctx).ok()?;
            scores.insert(name.clone(), x);
        }
        responses.push(Response { text: text.into_owned(), model: c.model.map(|m| m.0.into_owned()), scores });
    }
    if responses.is_empty() {
        return None;
    }
    // The skipped fields must be valid JSON by the Value path's rules too, or the two paths
    // would disagree on a record (issue 13: lone surrogates in rationales).
    serde_json::from_str::<Strict>(text).ok()?;
    Some(Draft { prompt, images: vec![crate::row::ImageSrc::Path(image.into_owned())], image_at, responses, ..Draft::default() })
}

/// Whether the fast path and the `Value` path agree on `text`: where the fast path answers, the
/// `Value` path parses the same draft with no rejects. The property the agreement test and the
/// fuzz target (`rust_pairs/fuzz`) check.
pub fn fast_path_agrees(text: &str, ctx: &Ctx) -> Result<(), String> {
    let Some(fast) = vlfeedback_fast(text, ctx) else { return Ok(()) };
    let value: Value = serde_json::from_str(text).map_err(|e| format!("fast path accepted what the Value path rejects: {e}"))?;
    let slow = super::parse(&value, crate::config::Format::Vlfeedback, ctx);
    if !slow.response_rejects.is_empty() {
        return Err(format!("fast path accepted responses the Value path rejects: {:?}", slow.response_rejects));
    }
    match slow.draft {
        Ok(d) if d == fast => Ok(()),
        other => Err(format!("paths differ: fast {fast:?}, Value {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Format;
    use crate::layout::{detect, parse};
    use crate::record::Source;
    use serde_json::json;

    fn ctx<'a>(src: &'a Source, aspects: &'a [(String, f64)]) -> Ctx<'a> {
        Ctx::plain(src, aspects, 1000)
    }
    fn vlf_aspects() -> Vec<(String, f64)> {
        crate::config::VLFEEDBACK_ASPECTS.iter().map(|s| (s.to_string(), 1.0)).collect()
    }
    fn ann(h: Value, v: Value, e: Value) -> Value {
        json!({"Helpfulness": {"Rating": h, "Rationale": "r"}, "Visual Faithfulness": {"Rating": v}, "Ethical Considerations": {"Rating": e}})
    }

    #[test]
    fn vlfeedback_rows_and_columns_agree() {
        let src = Source::line("f", 1);
        let a = vlf_aspects();
        let rows = json!({"id": "1", "prompt": "<image>\nWhat?", "img_path": "x.png", "completions": [
            {"model": "m1", "response": "A", "annotations": ann(json!("4"), json!(5), json!("3"))},
            {"model": "m2", "response": "B", "annotations": ann(json!("N/A"), json!(5), json!(3))},
        ]});
        let cols = json!({"id": "1", "prompt": "<image>\nWhat?", "img_path": "x.png", "completions": {
            "model": ["m1", "m2"], "response": ["A", "B"],
            "annotations": [ann(json!("4"), json!(5), json!("3")), ann(json!("N/A"), json!(5), json!(3))],
        }});
        for v in [rows, cols] {
            assert_eq!(detect(&v), Some(Format::Vlfeedback));
            let p = parse(&v, Format::Vlfeedback, &ctx(&src, &a));
            let d = p.draft.unwrap();
            assert_eq!(d.prompt, "What?");
            assert_eq!(d.responses.len(), 1);
            assert_eq!(d.responses[0].scores["Helpfulness"], 4.0);
            assert_eq!(p.response_rejects.len(), 1);
            let r = &p.response_rejects[0];
            assert_eq!(r.field, "completions[1].annotations.Helpfulness");
            assert!(r.reason.contains("non-numeric rating \"N/A\""), "{}", r.reason);
        }
    }

    #[test]
    fn rated_nested_and_flat_scores() {
        let src = Source::line("f", 3);
        let a: Vec<(String, f64)> = vec![("helpfulness".into(), 1.0), ("clarity".into(), 2.0)];
        let v = json!({"prompt": "Q", "image": "i.jpg", "responses": [
            {"text": "one", "scores": {"Helpfulness": 3, "clarity": 1}},
            {"response": "two", "model": "m", "helpfulness": 1, "clarity": "2"},
            {"text": "three", "scores": {"helpfulness": 1}},
        ]});
        let p = parse(&v, Format::Rated, &ctx(&src, &a));
        let d = p.draft.unwrap();
        assert_eq!(d.responses.len(), 2);
        assert_eq!(d.responses[1].scores["clarity"], 2.0);
        assert_eq!(p.response_rejects[0].field, "responses[2].scores.clarity");
    }

    #[test]
    fn record_level_rejects_name_field() {
        let src = Source::line("f", 9);
        let a = vlf_aspects();
        let cases = [
            (json!({"prompt": 3, "img_path": "x", "completions": []}), "prompt", "expected a string, got number"),
            (json!({"prompt": "q", "img_path": ["a.png", 3], "completions": []}), "img_path", "item 1: expected an image path"),
            (json!({"prompt": "q", "img_path": "x", "completions": []}), "completions", "no responses"),
            (json!({"prompt": "  ", "img_path": "x", "completions": []}), "prompt", "empty text"),
            (json!({"prompt": "q", "img_path": "x", "completions": {"model": ["a"], "response": []}}), "completions.response", "column form"),
            (json!([1, 2]), "$", "expected a JSON object"),
        ];
        for (v, field, reason) in cases {
            let r = parse(&v, Format::Vlfeedback, &ctx(&src, &a)).draft.unwrap_err();
            assert_eq!(r.field, field, "{v}");
            assert!(r.reason.contains(reason), "{} vs {reason}", r.reason);
            assert_eq!(r.line, 9);
        }
    }
    #[test]
    fn vlfeedback_fast_path_agrees_or_defers() {
        let src = Source::line("f", 1);
        let a = vlf_aspects();
        let c = ctx(&src, &a);
        let ok = [
            r#"{"id": "1", "prompt": "<image>\nWhat?", "img_path": "x.png", "models": ["m1"], "completions": [
                {"model": "m1", "response": "A \"quoted\" \u00e9 answer", "annotations": {"Helpfulness": {"Rating": "4", "Rationale": "r"},
                 "visual faithfulness": {"rating": 5}, "Ethical Considerations": {"Rating": " 3.5 "}}},
                {"model": null, "response": "B", "extra": [1, {"x": 2}], "annotations": {"Helpfulness": 2,
                 "Visual Faithfulness": "1", "Ethical Considerations": {"Rationale": "x", "RATING": {"Rating": 1e0}}, "Other": "N/A"}}]}"#,
            r#"{"prompt": "Q", "question": "ignored", "img_path": "a b.jpg", "completions": [{"response": "only", "annotations":
                {"Helpfulness": -1, "Visual Faithfulness": 0, "Ethical Considerations": 2}}]}"#,
        ];
        for t in ok {
            let v: Value = serde_json::from_str(t).unwrap();
            let slow = parse(&v, Format::Vlfeedback, &c);
            assert!(slow.response_rejects.is_empty());
            assert_eq!(vlfeedback_fast(t, &c), Some(slow.draft.unwrap()), "{t}");
        }
        let defer = [
            r#"{"prompt": "Q", "img_path": "x", "completions": [{"response": "A", "annotations": {"Helpfulness": "N/A", "Visual Faithfulness": 1, "Ethical Considerations": 1}}]}"#,
            r#"{"prompt": "Q", "img_path": "x", "completions": [{"response": " ", "annotations": {"Helpfulness": 1, "Visual Faithfulness": 1, "Ethical Considerations": 1}}]}"#,
            r#"{"prompt": "Q", "img_path": "x", "completions": [{"response": "A", "annotations": {"Helpfulness": 1, "Visual Faithfulness": 1}}]}"#,
            r#"{"prompt": "Q", "img_path": "x", "completions": [{"response": "A", "annotations": {"Helpfulness": 1, "helpfulness": 2, "Visual Faithfulness": 1, "Ethical Considerations": 1}}]}"#,
            r#"{"prompt": "Q", "img_path": "x", "completions": [{"response": "A", "annotations": {"Helpfulness": {"Rating": 1, "rating": 2}, "Visual Faithfulness": 1, "Ethical Considerations": 1}}]}"#,
            r#"{"prompt": "Q", "img_path": "x", "completions": [{"response": "A", "annotations": {"Helpfulness": null, "Visual Faithfulness": 1, "Ethical Considerations": 1}}]}"#,
            r#"{"prompt": "Q", "img_path": "x", "completions": {"response": ["A"], "annotations": [{"Helpfulness": 1, "Visual Faithfulness": 1, "Ethical Considerations": 1}]}}"#,
            r#"{"prompt": "Q", "prompt": "R", "img_path": "x", "completions": [{"response": "A", "annotations": {"Helpfulness": 1, "Visual Faithfulness": 1, "Ethical Considerations": 1}}]}"#,
            r#"{"question": "Q", "img_path": "x", "completions": [{"response": "A", "annotations": {"Helpfulness": 1, "Visual Faithfulness": 1, "Ethical Considerations": 1}}]}"#,
            r#"{"prompt": "Q", "image": "x", "completions": [{"response": "A", "annotations": {"Helpfulness": 1, "Visual Faithfulness": 1, "Ethical Considerations": 1}}]}"#,
            r#"{"prompt": "<image>", "img_path": "x", "completions": [{"response": "A", "annotations": {"Helpfulness": 1, "Visual Faithfulness": 1, "Ethical Considerations": 1}}]}"#,
            r#"{"prompt": "Q", "img_path": "x", "completions": []}"#,
            r#"{"prompt": "Q", "img_path": "x", "completions": [{"model": 3, "response": "A", "annotations": {"Helpfulness": 1, "Visual Faithfulness": 1, "Ethical Considerations": 1}}]}"#,
            r#"[1, 2]"#,
        ];
        for t in defer {
            assert_eq!(vlfeedback_fast(t, &c), None, "{t}");
        }
        assert_eq!(vlfeedback_fast(ok[1], &ctx(&src, &[])), None);
    }

    #[test]
    fn fast_path_rejects_what_the_value_path_rejects_in_skipped_fields() {
        let src = Source::line("f".to_string(), 1);
        let a = vlf_aspects();
        let c = ctx(&src, &a);
        let row = |rationale: &str, extra: &str| {
            format!(
                r#"{{"id": "1", "prompt": "Q", "img_path": "x.png", "models": ["m"]{extra}, "completions": [{{"model": "m", "response": "A",
                "annotations": {{"Helpfulness": {{"Rating": 4, "Rationale": "{rationale}"}}, "Visual Faithfulness": 3, "Ethical Considerations": 5}}}}]}}"#
            )
        };
        assert!(vlfeedback_fast(&row("fine \\u00e9 \\ud83d\\ude00", ""), &c).is_some());
        for bad in [row("lone \\udc00 surrogate", ""), row("lone \\ud800", ""), row("r", r#", "x": 1e999"#), row("r", r#", "x": [1, -1e400]"#)] {
            assert!(serde_json::from_str::<Value>(&bad).is_err(), "{bad}");
            assert_eq!(vlfeedback_fast(&bad, &c), None, "{bad}");
        }
    }

    /// Seeded mutations of valid rows (byte edits, spliced escapes, numbers, keys): on every one
    /// the two paths agree. The fuzz target checks the same property without a seed.
    #[test]
    fn fast_and_value_paths_agree_on_mutated_records() {
        let src = Source::line("f".to_string(), 1);
        let a = vlf_aspects();
        let c = ctx(&src, &a);
        let base = r#"{"id": "7", "prompt": "<image>\nWhat is it?", "img_path": "a.png", "models": ["m1", "m2"], "completions": [
            {"model": "m1", "response": "A cat \"here\".", "annotations": {"Helpfulness": {"Rating": "4", "Rationale": "ok \u00e9"},
             "Visual Faithfulness": {"Rating": 5, "Rationale": "r"}, "Ethical Considerations": {"Rating": 3}}},
            {"model": "m2", "response": "A dog.", "annotations": {"Helpfulness": {"Rating": 2, "Rationale": "no"},
             "Visual Faithfulness": {"Rating": "1", "Rationale": ""}, "Ethical Considerations": {"Rating": 5, "Rationale": "fine"}}}]}"#;
        let pieces: [&str; 16] = [
            "\\udc00", "\\ud800", "\\ud83d\\ude00", "\\u0000", "1e999", "-0", "1e2", "\"", "\\", ",", "}", "]", "null",
            r#""Rating": 9"#, r#""x": {"y": [1, 2.5e308]}"#, "\u{e9}",
        ];
        let mut x: u64 = 0x9E3779B97F4A7C15;
        let mut next = |m: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % m as u64) as usize
        };
        let mut answered = 0;
        for _ in 0..20_000 {
            let mut t: Vec<u8> = base.as_bytes().to_vec();
            for _ in 0..1 + next(3) {
                let at = next(t.len());
                match next(4) {
                    0 => {
                        let alphabet = b" \"\\{}[]:,0123456789eE.-+abcdefu";
                        t[at] = alphabet[next(alphabet.len())];
                    }
                    1 => {
                        t.remove(at);
                    }
                    _ => {
                        let p = pieces[next(pieces.len())];
                        t.splice(at..at, p.bytes());
                    }
                }
            }
            let Ok(text) = std::str::from_utf8(&t) else { continue };
            if let Err(e) = fast_path_agrees(text, &c) {
                panic!("{e}\non: {text}");
            }
            answered += vlfeedback_fast(text, &c).is_some() as usize;
        }
        assert!(answered > 1000, "the mutations should leave many rows valid ({answered})");
    }
}
