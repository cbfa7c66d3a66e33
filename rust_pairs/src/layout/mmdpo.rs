//! MM-DPO's DPO file (findalexli/mllm-dpo, `encode_multimodal_preference_sample`): a JSON list
//! of rows whose `question` is a `{"from": "human", "value": ...}` turn, `chosen`/`rejected` are
//! `{"from": "gpt", "value": ...}` turns or whole conversations (lists of turns), any of them
//! possibly the Python `str()` of the dict (the notebooks round-trip through CSV; the seed code
//! calls `ast.literal_eval`, we read it with [`super::pylit`]). `image` is a file name under
//! `--image-root`. Reference log-probs the file ships (`ref_win_logp`, `ref_rej_logp`, and the
//! per-token averages) are kept with the pair.

use super::common::*;
use super::{pylit, Ctx, Draft, Parsed};
use crate::record::RefLogps;
use serde_json::{Map, Value};
use std::borrow::Cow;

/// A field as a turn / list of turns: Python-literal strings are read as literals; other
/// strings are plain text.
fn turn_value<'v>(v: &'v Value, field: &str) -> Result<Cow<'v, Value>, FieldErr> {
    if let Value::String(s) = v {
        let t = s.trim_start();
        if t.starts_with('{') || t.starts_with('[') {
            return match pylit::parse(s) {
                Ok(lit @ (Value::Object(_) | Value::Array(_))) => Ok(Cow::Owned(lit)),
                Ok(_) => Ok(Cow::Borrowed(v)),
                Err(e) => err(field, format!("looks like a Python literal but does not parse: {e}")),
            };
        }
    }
    Ok(Cow::Borrowed(v))
}

fn number(o: &Map<String, Value>, k: &str) -> Result<Option<f64>, FieldErr> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => err(k, format!("expected a number, got {}", type_name(other))),
    }
}

fn ref_logps(o: &Map<String, Value>) -> Result<Option<RefLogps>, FieldErr> {
    let (Some(chosen), Some(rejected)) = (number(o, "ref_win_logp")?, number(o, "ref_rej_logp")?) else {
        return Ok(None);
    };
    Ok(Some(RefLogps {
        chosen,
        rejected,
        chosen_avg: number(o, "ref_win_avg_logp")?,
        rejected_avg: number(o, "ref_rej_avg_logp")?,
        fields: "ref_win_logp, ref_rej_logp".into(),
    }))
}

pub fn parse(o: &Map<String, Value>, ctx: &Ctx) -> Parsed {
    let res = (|| -> Result<Draft, FieldErr> {
        let chosen_v = o.get("chosen").ok_or_else(|| ("chosen".to_string(), "missing field".to_string()))?;
        let rejected_v = o.get("rejected").ok_or_else(|| ("rejected".to_string(), "missing field".to_string()))?;
        let chosen_v = turn_value(chosen_v, "chosen")?;
        let rejected_v = turn_value(rejected_v, "rejected")?;
        // The question, or (conversation form) the human turn of the chosen conversation.
        let prompt = match o.get("question").filter(|v| !v.is_null()) {
            Some(q) => user_prompt(&*turn_value(q, "question")?, "question")?,
            None if chosen_v.is_array() => user_prompt(&chosen_v, "chosen")?,
            None => return err("question", "missing field"),
        };
        let chosen = answer(&chosen_v, "chosen")?;
        let rejected = answer(&rejected_v, "rejected")?;
        let images = image_of(o, ctx, None)?;
        pair_draft(ctx, ("question", &prompt), images, ("chosen", chosen), ("rejected", rejected), (None, None), ref_logps(o)?)
    })();
    finish(ctx, res)
}

#[cfg(test)]
mod tests {
    use crate::config::Format;
    use crate::layout::{detect, parse, Ctx};
    use crate::record::Source;
    use serde_json::json;

    #[test]
    fn dict_python_str_and_conversation_forms() {
        let src = Source::line("f", 1);
        let c = Ctx::plain(&src, &[], 1000);
        let rows = [
            json!({"question": {"from": "human", "value": "<image>\nWhat is it?"}, "chosen": {"from": "gpt", "value": "A cat."},
                   "rejected": {"from": "gpt", "value": "A dog."}, "image": "1.jpg", "ref_win_logp": -10.5, "ref_rej_logp": -20.25,
                   "ref_win_avg_logp": -1.5, "ref_rej_avg_logp": -2.0, "ref_win_per_token_logp": [-1.0], "ref_rej_per_token_logp": [-2.0]}),
            json!({"question": "{'from': 'human', 'value': '<image>\\nWhat is it?'}", "chosen": "{'from': 'gpt', 'value': 'A cat.'}",
                   "rejected": "{'from': 'gpt', 'value': \"A dog.\"}", "image": "1.jpg"}),
            json!({"chosen": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}],
                   "rejected": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A dog."}], "image": "1.jpg"}),
        ];
        for (i, v) in rows.iter().enumerate() {
            assert_eq!(detect(v), Some(Format::Mmdpo), "{v}");
            let d = parse(v, Format::Mmdpo, &c).draft.unwrap();
            assert_eq!((d.prompt.as_str(), d.responses[0].text.as_str(), d.responses[1].text.as_str()), ("What is it?", "A cat.", "A dog."));
            assert_eq!(d.pair_ref_logps[0].is_some(), i == 0);
        }
        let r = parse(&rows[0], Format::Mmdpo, &c).draft.unwrap();
        let lp = r.pair_ref_logps[0].as_ref().unwrap();
        assert_eq!((lp.chosen, lp.rejected, lp.chosen_avg, lp.rejected_avg), (-10.5, -20.25, Some(-1.5), Some(-2.0)));
        let bad = json!({"question": "{'from': 'human', 'value': __import__('os')}", "chosen": "a", "rejected": "b", "image": "1.jpg"});
        let e = parse(&bad, Format::Mmdpo, &c).draft.unwrap_err();
        assert_eq!(e.field, "question");
        assert!(e.reason.contains("Python literal"), "{}", e.reason);
    }
}
