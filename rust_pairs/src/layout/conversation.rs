//! Chat-turn layouts: the prompt and the answers are turns of a conversation.
//!
//! - TRL's vision format: `images` + `prompt` (the user turn), `chosen` and `rejected` (the
//!   assistant turn) as lists of `{role, content}` messages; content is a string or a list of
//!   `{type: text|image}` blocks.
//! - POVID: `conversations` (human + chosen gpt turn) and `rejected_conversations` (the same
//!   human turn + the rejected gpt turn); the last assistant turn of each is the answer.
//! - LLaVA-RLHF human preference: `conversations` (the human turn), `output_1`, `output_2`
//!   (`{from, value}` turns) and `preference` (1 or 2: which output the annotator preferred).

use super::common::*;
use super::{Ctx, Draft, Parsed};
use serde_json::{Map, Value};

fn need<'v>(o: &'v Map<String, Value>, k: &str) -> Result<&'v Value, FieldErr> {
    o.get(k).filter(|v| !v.is_null()).ok_or_else(|| (k.to_string(), "missing field".to_string()))
}

pub fn trl(o: &Map<String, Value>, ctx: &Ctx) -> Parsed {
    let res = (|| -> Result<Draft, FieldErr> {
        let prompt_v = need(o, "prompt")?;
        let prompt = user_prompt(prompt_v, "prompt")?;
        // Image blocks became `<image>` placeholders where they stand: `place` checks their count.
        let images = image_of(o, ctx, None)?;
        let chosen = answer(need(o, "chosen")?, "chosen")?;
        let rejected = answer(need(o, "rejected")?, "rejected")?;
        pair_draft(ctx, ("prompt", &prompt), images, ("chosen", chosen), ("rejected", rejected), (None, None), None)
    })();
    finish(ctx, res)
}

pub fn povid(o: &Map<String, Value>, ctx: &Ctx) -> Parsed {
    let res = (|| -> Result<Draft, FieldErr> {
        let conv = need(o, "conversations")?;
        let rconv = need(o, "rejected_conversations")?;
        let prompt = user_prompt(conv, "conversations")?;
        let rprompt = user_prompt(rconv, "rejected_conversations")?;
        if clean(&prompt) != clean(&rprompt) {
            return err("rejected_conversations", "its human turn differs from the one in conversations");
        }
        let images = image_of(o, ctx, None)?;
        let chosen = answer(conv, "conversations")?;
        let rejected = answer(rconv, "rejected_conversations")?;
        pair_draft(ctx, ("conversations", &prompt), images, ("conversations", chosen), ("rejected_conversations", rejected), (None, None), None)
    })();
    finish(ctx, res)
}

fn clean(s: &str) -> String {
    s.replace("<image>", " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn llava_rlhf(o: &Map<String, Value>, ctx: &Ctx) -> Parsed {
    let res = (|| -> Result<Draft, FieldErr> {
        let prompt = user_prompt(need(o, "conversations")?, "conversations")?;
        let images = image_of(o, ctx, None)?;
        let out1 = answer(need(o, "output_1")?, "output_1")?;
        let out2 = answer(need(o, "output_2")?, "output_2")?;
        let pref = need(o, "preference")?;
        let (chosen, rejected) = match pref.as_f64() {
            Some(p) if p == 1.0 => (("output_1", out1), ("output_2", out2)),
            Some(p) if p == 2.0 => (("output_2", out2), ("output_1", out1)),
            _ => return err("preference", format!("expected 1 or 2, got {pref}")),
        };
        pair_draft(ctx, ("conversations", &prompt), images, chosen, rejected, (None, None), None)
    })();
    finish(ctx, res)
}

#[cfg(test)]
mod tests {
    use crate::config::Format;
    use crate::layout::{detect, parse, Ctx};
    use crate::record::Source;
    use crate::row::ImageSrc;
    use serde_json::{json, Value};

    fn p(s: &str) -> Vec<ImageSrc> {
        vec![ImageSrc::Path(s.into())]
    }

    fn texts(v: &Value, f: Format) -> (String, Vec<ImageSrc>, String, String) {
        let src = Source::line("f", 1);
        let d = parse(v, f, &Ctx::plain(&src, &[], 1000)).draft.unwrap();
        assert_eq!(d.explicit_pairs, vec![(0, 1)]);
        (d.prompt, d.images, d.responses[0].text.clone(), d.responses[1].text.clone())
    }

    #[test]
    fn trl_vision_messages() {
        let v = json!({"images": ["a.jpg"],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
            "rejected": [{"role": "assistant", "content": "A dog."}]});
        assert_eq!(detect(&v), Some(Format::Trl));
        assert_eq!(texts(&v, Format::Trl), ("What is it?".into(), p("a.jpg"), "A cat.".into(), "A dog.".into()));
        let two = json!({"images": ["a.jpg"],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]}],
            "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]});
        let src = Source::line("f", 1);
        let r = parse(&two, Format::Trl, &Ctx::plain(&src, &[], 1000)).draft.unwrap_err();
        assert_eq!(r.field, "prompt");
    }

    #[test]
    fn trl_image_blocks_are_placed_where_they_stand() {
        let src = Source::line("f", 1);
        let v = json!({"images": ["a.jpg", "b.jpg"],
            "prompt": [{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                {"type": "text", "text": " with "}, {"type": "image"}, {"type": "text", "text": ": which is older?"}]}],
            "chosen": [{"role": "assistant", "content": "The first."}], "rejected": [{"role": "assistant", "content": "The second."}]});
        let d = parse(&v, Format::Trl, &Ctx::plain(&src, &[], 1000)).draft.unwrap();
        assert_eq!((d.prompt.as_str(), d.image_at.clone()), ("Compare  with : which is older?", vec![8, 14]));
        // Consecutive text blocks still join with a newline; a prompt without image blocks puts images first.
        let v = json!({"images": ["a.jpg"], "prompt": [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]}],
            "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]});
        let d = parse(&v, Format::Trl, &Ctx::plain(&src, &[], 1000)).draft.unwrap();
        assert_eq!((d.prompt.as_str(), d.image_at.clone()), ("A\nB", vec![0]));
        // Image blocks in an answer are not text.
        let v = json!({"images": ["a.jpg"], "prompt": "Q", "chosen": [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
            "rejected": [{"role": "assistant", "content": "y"}]});
        assert_eq!(texts(&v, Format::Trl).2, "x");
    }

    #[test]
    fn trl_video_blocks_are_placed_where_they_stand() {
        let src = Source::line("f", 1);
        let v = json!({"videos": ["clip.mp4"], "images": ["a.jpg"],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this in"}, {"type": "video"},
                {"type": "text", "text": "?"}]}],
            "chosen": [{"role": "assistant", "content": "Yes."}], "rejected": [{"role": "assistant", "content": "No."}]});
        let d = parse(&v, Format::Trl, &Ctx::plain(&src, &[], 1000)).draft.unwrap();
        assert_eq!((d.prompt.as_str(), d.image_at.clone(), d.video_at.clone()), ("Is this in?", vec![0], vec![10]));
        // A video block without a video is a reject, not a text-only prompt.
        let mut none = v.clone();
        none.as_object_mut().unwrap().remove("videos");
        let r = parse(&none, Format::Trl, &Ctx::plain(&src, &[], 1000)).draft.unwrap_err();
        assert!(r.field == "prompt" && r.reason.contains("1 <video> placeholder in the prompt but 0 videos"), "{}", r.reason);
    }

    #[test]
    fn trl_text_prompt_with_full_conversations() {
        // UltraFeedback-binarised style: a plain prompt, chosen/rejected as whole conversations.
        let v = json!({"prompt": "Name a colour.",
            "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}],
            "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Seven."}]});
        assert_eq!(detect(&v), Some(Format::Trl));
        assert_eq!(texts(&v, Format::Trl), ("Name a colour.".into(), vec![], "Teal.".into(), "Seven.".into()));
        let multi = json!({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
            "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]});
        let src = Source::line("f", 1);
        let r = parse(&multi, Format::Trl, &Ctx::plain(&src, &[], 1000)).draft.unwrap_err();
        assert!(r.reason.contains("multi-turn"), "{}", r.reason);
        let system = json!({"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "c"}],
            "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]});
        let r = parse(&system, Format::Trl, &Ctx::plain(&src, &[], 1000)).draft.unwrap_err();
        assert!(r.field == "prompt" && r.reason.contains("system"), "{}", r.reason);
    }

    #[test]
    fn povid_and_llava_rlhf() {
        let v = json!({"id": "1", "image": "COCO_1.jpg",
            "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Two cats."}],
            "rejected_conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Three dogs."}]});
        assert_eq!(detect(&v), Some(Format::Povid));
        assert_eq!(texts(&v, Format::Povid), ("Describe.".into(), p("COCO_1.jpg"), "Two cats.".into(), "Three dogs.".into()));
        let mut l = json!({"id": "x", "image": "b.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"}],
            "output_1": {"from": "llava", "value": "first"}, "output_2": {"from": "llava", "value": "second"}, "preference": 2});
        assert_eq!(detect(&l), Some(Format::LlavaRlhf));
        assert_eq!(texts(&l, Format::LlavaRlhf).2, "second");
        l["preference"] = json!(1);
        assert_eq!(texts(&l, Format::LlavaRlhf).2, "first");
        l["preference"] = json!(3);
        let src = Source::line("f", 1);
        assert_eq!(parse(&l, Format::LlavaRlhf, &Ctx::plain(&src, &[], 1000)).draft.unwrap_err().field, "preference");
    }
}
