//! Layout detection from one record's keys (a file's layout is that of its first record that
//! says). Order matters: the most specific signatures come first.

use crate::config::Format;
use serde_json::Value;

/// A turn stored as the Python `str()` of a dict (MM-DPO).
fn python_turn(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        let s = s.trim_start();
        s.starts_with("{'from'") || s.starts_with("{'value'")
    })
}

fn is_turn(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.contains_key("from") && o.contains_key("value"))
}

fn is_messages(v: &Value) -> bool {
    v.as_array().is_some_and(|a| !a.is_empty() && a.iter().all(|m| m.get("role").is_some() && m.get("content").is_some()))
}

fn is_turns(v: &Value) -> bool {
    v.as_array().is_some_and(|a| !a.is_empty() && a.iter().all(is_turn))
}

/// Guess the layout of one record from its keys.
pub fn detect(v: &Value) -> Option<Format> {
    let o = v.as_object()?;
    let has = |k: &str| o.get(k).is_some_and(|v| !v.is_null());
    if has("completions") {
        Some(Format::Vlfeedback)
    } else if has("responses") {
        Some(Format::Rated)
    } else if has("response") && (has("prompt") || has("question")) && !has("chosen") && !has("rejected") {
        Some(Format::Rated) // one rated response per row (HelpSteer as released)
    } else if has("messages") && (has("rejected_response") || has("rejected_messages")) {
        Some(Format::MsSwift)
    } else if has("output_1") && has("output_2") && has("preference") {
        Some(Format::LlavaRlhf)
    } else if has("rejected_conversations") {
        Some(Format::Povid)
    } else if o.get("prompt").is_some_and(is_messages) || o.get("chosen").is_some_and(is_messages) {
        Some(Format::Trl)
    } else if has("conversations") && !has("question") && !has("ref_win_logp") && o.get("chosen").is_some_and(is_turn) {
        Some(Format::Pairwise) // LLaMA-Factory's sharegpt preference rows: chosen / rejected are single turns
    } else if has("ref_win_logp")
        || ["question", "chosen", "rejected"].iter().any(|k| o.get(*k).is_some_and(|v| is_turn(v) || python_turn(v)))
        || (!has("question") && !has("conversations") && o.get("chosen").is_some_and(is_turns))
    {
        Some(Format::Mmdpo)
    } else if has("chosen") || has("rejected") || has("reject") || has("text") {
        Some(Format::Pairwise)
    } else {
        None
    }
}
