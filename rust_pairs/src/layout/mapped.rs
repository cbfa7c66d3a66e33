//! Any row through declared fields: `--field prompt=question --field image=image_id
//! --field chosen=answers.good --field rejected=answers.bad` (dotted paths into nested objects;
//! numbers index lists). `prompt`, `chosen` and `rejected` are required; the image comes from
//! `--image-template`, else `--field image=...`, else the usual image keys; the videos from
//! `--field video=...`, else the usual video keys (read in [`super::video_of`]). Values may be
//! plain strings or chat turns.

use super::common::*;
use crate::row::image_refs;
use super::{Ctx, Draft, Parsed};
use serde_json::{Map, Value};

fn field<'v>(o: &'v Map<String, Value>, ctx: &Ctx, name: &str) -> Option<Result<(&'v Value, String), FieldErr>> {
    let path = &ctx.fields.iter().find(|(n, _)| n == name)?.1;
    Some(get_path(o, path).map(|v| (v, path.clone())).ok_or_else(|| (path.clone(), format!("missing field (declared by --field {name}={path})"))))
}

pub fn parse(o: &Map<String, Value>, ctx: &Ctx) -> Parsed {
    let res = (|| -> Result<Draft, FieldErr> {
        let required = |name: &str| field(o, ctx, name).unwrap_or_else(|| err(name, format!("no --field {name}=PATH declared")));
        let (pv, pk) = required("prompt")?;
        let prompt = user_prompt(pv, &pk)?;
        let (cv, ck) = required("chosen")?;
        let (rv, rk) = required("rejected")?;
        let chosen = answer(cv, &ck)?;
        let rejected = answer(rv, &rk)?;
        let images = match (ctx.image_template, field(o, ctx, "image")) {
            (None, Some(img)) => {
                let (v, k) = img?;
                image_refs(v).map_err(|why| (k, why))?
            }
            _ => image_of(o, ctx, None)?,
        };
        pair_draft(ctx, (&pk, &prompt), images, (&ck, chosen), (&rk, rejected), (None, None), None)
    })();
    finish(ctx, res)
}

#[cfg(test)]
mod tests {
    use crate::config::Format;
    use crate::layout::{parse, Ctx};
    use crate::record::Source;
    use serde_json::json;

    #[test]
    fn dotted_fields_and_template() {
        let src = Source::line("f", 4);
        let fields: Vec<(String, String)> = [("prompt", "q.text"), ("chosen", "answers.0"), ("rejected", "answers.1")]
            .iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let c = Ctx { fields: &fields, image_template: Some("imgs/{meta.id}.jpg"), ..Ctx::plain(&src, &[], 1000) };
        let v = json!({"q": {"text": "Why?"}, "answers": ["good", "bad"], "meta": {"id": 17}});
        let d = parse(&v, Format::Mapped, &c).draft.unwrap();
        assert_eq!((d.prompt.as_str(), d.responses[0].text.as_str(), d.responses[1].text.as_str()), ("Why?", "good", "bad"));
        assert_eq!(d.images, vec![crate::row::ImageSrc::Path("imgs/17.jpg".into())]);
        let missing = json!({"q": {"text": "Why?"}, "answers": ["good"], "meta": {"id": 17}});
        let r = parse(&missing, Format::Mapped, &c).draft.unwrap_err();
        assert_eq!(r.field, "answers.1");
        assert!(r.reason.contains("--field rejected=answers.1"));
        let no_id = json!({"q": {"text": "Why?"}, "answers": ["good", "bad"], "meta": {}});
        assert_eq!(parse(&no_id, Format::Mapped, &c).draft.unwrap_err().field, "meta.id");
    }

    #[test]
    fn a_declared_video_field() {
        use crate::video::VideoSrc;
        let src = Source::line("f", 2);
        let fields: Vec<(String, String)> = [("prompt", "q"), ("chosen", "good"), ("rejected", "bad"), ("video", "media.clip")]
            .iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let c = Ctx { fields: &fields, ..Ctx::plain(&src, &[], 1000) };
        let v = json!({"q": "What falls <video> first?", "good": "The cup.", "bad": "The plate.", "media": {"clip": "clips/7.webm"}});
        let d = parse(&v, Format::Mapped, &c).draft.unwrap();
        assert_eq!((d.prompt.as_str(), d.videos.clone(), d.video_at.clone()), ("What falls  first?", vec![VideoSrc::Path("clips/7.webm".into())], vec![11]));
        assert_eq!(d.video_fields, vec!["media.clip".to_string()]);
        // A frame list is one video; a declared field a row lacks is a reject naming it.
        let frames = json!({"q": "Q", "good": "a", "bad": "b", "media": {"clip": [["f/1.jpg", "f/2.jpg"]]}});
        assert_eq!(parse(&frames, Format::Mapped, &c).draft.unwrap().videos, vec![VideoSrc::Frames(vec!["f/1.jpg".into(), "f/2.jpg".into()])]);
        let r = parse(&json!({"q": "Q", "good": "a", "bad": "b"}), Format::Mapped, &c).draft.unwrap_err();
        assert!(r.field == "media.clip" && r.reason.contains("--field video=media.clip"), "{}", r.reason);
    }
}
