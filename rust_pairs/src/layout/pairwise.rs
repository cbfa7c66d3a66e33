//! Pairwise layouts: one explicit (chosen, rejected) per row.
//!
//! `{image, question, chosen, rejected}` as RLAIF-V and SPA-VL publish it; SeVa's DPO file
//! (`{chosen, reject, question, image_id}`); RLHF-V's `text` object (or JSON string) holding question/chosen/rejected;
//! LLaVA-style `conversations` as the prompt and chosen/rejected as turns (LLaMA-Factory's sharegpt
//! preference rows: `conversations`, `chosen` and `rejected` `{from, value}` turns, `images`,
//! `videos`); ShareGPT-Video / LLaVA-Hound's DPO rows (`{id, prompt, answer, chosen, rejected,
//! chosen_score, rejected_score, video}`, `video` a frame folder) and MM-RLHF's `dpo_pairs.jsonl`
//! rows (`{video or image, prompt, chosen, rejected, chosen_reason, ...}`).

use super::common::*;
use super::{Ctx, Draft, Parsed};
use serde_json::{Map, Value};

/// `conversations`' single human turn, as the prompt of LLaVA-style pairwise rows.
fn conversation_prompt(v: &Value) -> Result<String, FieldErr> {
    user_prompt(v, "conversations")
}

pub fn parse(o: &Map<String, Value>, ctx: &Ctx) -> Parsed {
    let res = (|| -> Result<Draft, FieldErr> {
        // RLHF-V keeps question/chosen/rejected inside "text", sometimes as a JSON string.
        let inner: Option<Map<String, Value>> = match o.get("text") {
            Some(Value::Object(m)) => Some(m.clone()),
            Some(Value::String(s)) if o.get("chosen").is_none() => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(m)) => Some(m),
                _ => return err("text", "expected an object (or a JSON string of one) with question, chosen, rejected"),
            },
            _ => None,
        };
        let fields = inner.as_ref().unwrap_or(o);
        let (pk, prompt) = match first(fields, &PROMPT_KEYS) {
            Some((k, Value::String(s))) => (k, s.clone()),
            Some((k, other)) => return err(k, format!("expected a string, got {}", type_name(other))),
            None => match o.get("conversations") {
                Some(c) => {
                    // LLaMA-Factory's sharegpt rows keep a system prompt beside the conversation.
                    if o.get("system").and_then(Value::as_str).is_some_and(|s| !s.trim().is_empty()) {
                        return err("system", "a system prompt: the sample holds one user prompt, a system prompt would be lost");
                    }
                    ("conversations", conversation_prompt(c)?)
                }
                None => return err("question", "missing field (expected question, prompt or conversations)"),
            },
        };
        let images = image_of(o, ctx, None)?;
        let chosen_v = fields.get("chosen").ok_or_else(|| ("chosen".to_string(), "missing field".to_string()))?;
        let (rk, rejected_v) = first(fields, &["rejected", "reject"])
            .ok_or_else(|| ("rejected".to_string(), "missing field (expected rejected or reject)".to_string()))?;
        let chosen = answer(chosen_v, "chosen")?;
        let rejected = answer(rejected_v, rk)?;
        let model = |k: &str| fields.get(k).and_then(Value::as_str).map(String::from);
        pair_draft(ctx, (pk, &prompt), images, ("chosen", chosen), (rk, rejected), (model("chosen_model"), model("rejected_model")), None)
    })();
    finish(ctx, res)
}

#[cfg(test)]
mod tests {
    use crate::config::Format;
    use crate::layout::{detect, parse, Ctx};
    use crate::record::Source;
    use serde_json::json;

    fn ctx<'a>(src: &'a Source, aspects: &'a [(String, f64)]) -> Ctx<'a> {
        Ctx::plain(src, aspects, 1000)
    }

    #[test]
    fn pairwise_spellings() {
        let src = Source::line("f", 1);
        let seva = json!({"image": "a.jpg", "question": "Q?", "chosen": "yes", "reject": "no"});
        let llava = json!({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "x"}],
            "chosen": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "yes"}], "rejected": "no"});
        let rlhfv = json!({"image": "a.jpg", "text": "{\"question\": \"Q?\", \"chosen\": \"yes\", \"rejected\": \"no\"}"});
        for v in [seva, llava, rlhfv] {
            assert_eq!(detect(&v), Some(Format::Pairwise));
            let d = parse(&v, Format::Pairwise, &ctx(&src, &[])).draft.unwrap();
            assert_eq!((d.prompt.as_str(), d.responses[0].text.as_str(), d.responses[1].text.as_str()), ("Q?", "yes", "no"));
            assert_eq!(d.explicit_pairs, vec![(0, 1)]);
        }
    }

    #[test]
    fn long_text_is_rejected() {
        let src = Source::line("f", 9);
        let long = "x".repeat(1001);
        let v = json!({"image": "a", "question": "q", "chosen": long, "rejected": "n"});
        let r = parse(&v, Format::Pairwise, &ctx(&src, &[])).draft.unwrap_err();
        assert!(r.reason.contains("over the limit"));
    }

    #[test]
    fn records_with_videos_are_parsed_with_them_and_unreadable_video_fields_rejected() {
        use crate::video::VideoSrc;
        let src = Source::line("f", 3);
        // MM-RLHF's dpo_pairs rows name a frame folder in `video` (an empty `image` beside it names no image)
        let mmrlhf = json!({"video": "long/frames_0001", "image": "", "prompt": "What happens after the man sits?",
            "chosen": "He opens a book.", "rejected": "He leaves.", "chosen_reason": "r", "rejected_reason": "r"});
        assert_eq!(detect(&mmrlhf), Some(Format::Pairwise));
        let d = parse(&mmrlhf, Format::Pairwise, &ctx(&src, &[])).draft.unwrap();
        assert_eq!((d.images.len(), d.videos.clone(), d.video_at.clone()), (0, vec![VideoSrc::Path("long/frames_0001".into())], vec![0]));
        assert_eq!(d.video_fields, vec!["video".to_string()]);
        // LLaVA-Hound (ShareGPT-Video) sft_dpo_17k rows
        let hound = json!({"id": "v_123_0", "prompt": "<video>\nWhat is the person doing?", "answer": "Cooking.",
            "chosen": "The person is cooking pasta.", "rejected": "The person is dancing.", "chosen_score": 5.0, "rejected_score": 2.0,
            "video": "v_123"});
        let d = parse(&hound, Format::Pairwise, &ctx(&src, &[])).draft.unwrap();
        assert_eq!((d.prompt.as_str(), d.video_at.clone()), ("What is the person doing?", vec![0]));
        // LLaMA-Factory's sharegpt preference rows: turns, `videos`, `<video>` where it stands
        let lf = json!({"conversations": [{"from": "human", "value": "Watch <video> and say what falls."}],
            "chosen": {"from": "gpt", "value": "A cup."}, "rejected": {"from": "gpt", "value": "A plate."}, "videos": ["a.mp4"]});
        assert_eq!(detect(&lf), Some(Format::Pairwise));
        let d = parse(&lf, Format::Pairwise, &ctx(&src, &[])).draft.unwrap();
        assert_eq!((d.prompt.as_str(), d.video_at.clone(), d.responses[0].text.as_str()), ("Watch  and say what falls.", vec![6], "A cup."));
        let mut with_system = lf.clone();
        with_system["system"] = json!("You are a video assistant.");
        assert_eq!(parse(&with_system, Format::Pairwise, &ctx(&src, &[])).draft.unwrap_err().field, "system");
        // A video field that cannot be read is a reject naming it, never a text-only record.
        for (bad, field, why) in [
            (json!({"video": 3}), "video", "got number"),
            (json!({"videos": ["a.mp4", ""]}), "videos", "item 1: empty video path"),
            (json!({"videos": ["a.mp4"], "video": "b"}), "video", "ambiguous"),
            (json!({"videos": [["f1.jpg", 7]]}), "videos", "frame 1"),
        ] {
            let mut v = json!({"image": "a.jpg", "question": "Q?", "chosen": "yes", "rejected": "no"});
            v.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
            let r = parse(&v, Format::Pairwise, &ctx(&src, &[])).draft.unwrap_err();
            assert_eq!((r.field.as_str(), r.line), (field, 3), "{}", r.reason);
            assert!(r.reason.contains(why), "{}", r.reason);
        }
        for empty in [json!(null), json!(""), json!([]), json!({})] {  // no video in it: built as before
            let v = json!({"image": "a.jpg", "question": "Q?", "chosen": "yes", "rejected": "no", "video": empty});
            let d = parse(&v, Format::Pairwise, &ctx(&src, &[])).draft.unwrap();
            assert!(d.videos.is_empty() && d.video_at.is_empty());
        }
    }
}
