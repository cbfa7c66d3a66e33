//! Any row through declared fields: `--field prompt=question --field image=image_id
//! --field chosen=answers.good --field rejected=answers.bad` (dotted paths into nested objects;
//! numbers index lists). `prompt`, `chosen` and `rejected` are required; the image comes from
//! `--image-template`, else `--field image=...`, else the usual image keys. Values may be plain
//! strings or chat turns.

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
}
