//! Pairwise layouts: one explicit (chosen, rejected) per row.
//!
//! `{image, question, chosen, rejected}` as RLAIF-V, SPA-VL and POVID-style exports publish it;
//! SeVa's `reject`; RLHF-V's `text` object (or JSON string) holding question/chosen/rejected;
//! LLaVA-style `conversations` as the prompt and chosen/rejected as turns.

use super::common::*;
use super::{Ctx, Draft, Parsed};
use crate::record::Response;
use crate::text::clean_prompt;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The last assistant turn of a LLaVA-style conversation, or a plain string.
fn answer(v: &Value, field: &str) -> Result<String, FieldErr> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(turns) => turns
            .iter()
            .rev()
            .find_map(|t| {
                let t = t.as_object()?;
                let role = t.get("from").or_else(|| t.get("role"))?.as_str()?;
                let is_assistant = matches!(role, "gpt" | "assistant" | "model");
                let text = t.get("value").or_else(|| t.get("content"))?.as_str()?;
                is_assistant.then(|| text.to_string())
            })
            .ok_or_else(|| (field.to_string(), "conversation has no assistant turn".to_string())),
        other => err(field, format!("expected a string or a conversation, got {}", type_name(other))),
    }
}

/// The first human turn of LLaVA-style `conversations`.
fn conversation_prompt(v: &Value) -> Result<String, FieldErr> {
    let Value::Array(turns) = v else {
        return err("conversations", format!("expected a list of turns, got {}", type_name(v)));
    };
    turns
        .iter()
        .find_map(|t| {
            let t = t.as_object()?;
            let role = t.get("from").or_else(|| t.get("role"))?.as_str()?;
            matches!(role, "human" | "user").then(|| t.get("value").or_else(|| t.get("content"))?.as_str().map(String::from))?
        })
        .ok_or_else(|| ("conversations".to_string(), "no human turn".to_string()))
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
        let prompt = match first(fields, &PROMPT_KEYS) {
            Some((k, Value::String(s))) => (k.to_string(), s.clone()),
            Some((k, other)) => return err(k, format!("expected a string, got {}", type_name(other))),
            None => match o.get("conversations") {
                Some(c) => ("conversations".to_string(), conversation_prompt(c)?),
                None => return err("question", "missing field (expected question, prompt or conversations)"),
            },
        };
        let prompt_text = clean_prompt(&prompt.1);
        check_text(&prompt.0, &prompt_text, ctx)?;
        let images = image_field(o)?;
        let chosen_v = fields.get("chosen").ok_or_else(|| ("chosen".to_string(), "missing field".to_string()))?;
        let (rk, rejected_v) = first(fields, &["rejected", "reject"])
            .ok_or_else(|| ("rejected".to_string(), "missing field (expected rejected or reject)".to_string()))?;
        let chosen = answer(chosen_v, "chosen")?;
        let rejected = answer(rejected_v, rk)?;
        check_text("chosen", &chosen, ctx)?;
        check_text(rk, &rejected, ctx)?;
        let model = |k: &str| fields.get(k).and_then(Value::as_str).map(String::from);
        let responses = vec![
            Response { text: chosen, model: model("chosen_model"), scores: BTreeMap::new() },
            Response { text: rejected, model: model("rejected_model"), scores: BTreeMap::new() },
        ];
        Ok(Draft { prompt: prompt_text, images, responses, explicit_pairs: vec![(0, 1)] })
    })();
    match res {
        Ok(d) => Parsed { draft: Ok(d), response_rejects: vec![] },
        Err(e) => record_reject(ctx, e),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Format;
    use crate::layout::{detect, parse, Ctx};
    use crate::record::Source;
    use serde_json::json;

    fn ctx<'a>(src: &'a Source, aspects: &'a [(String, f64)]) -> Ctx<'a> {
        Ctx { src, aspects, max_text_chars: 1000, rating_scale: None }
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
}
